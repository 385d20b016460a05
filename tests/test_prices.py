"""The price table is built from AWS Price List offer files (tools/build_prices.py): the
fixture offers build exactly the expected table, the committed table is the build of its
template and committed offers, every key tools/cost.py reads is built, and a key that
matches no SKU, several SKUs or an unexpected unit is an error naming the key and what
was found."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import urllib.error
import urllib.parse
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools import build_prices as bp
from tools import cost as costmod

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "prices"
OFFERS = FIX / "offers"
TEMPLATE = FIX / "template.yaml"
REGION = "ap-northeast-2"
Offers = dict[str, dict[str, Any]]


def fixture_offers() -> Offers:
    return {p.stem: json.loads(p.read_text()) for p in sorted(OFFERS.glob("*.json"))}


def build_from(tmp: Path, offers: Offers, template_text: str | None = None) -> str:
    d = tmp / "offers"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for code, data in offers.items():
        (d / f"{code}.json").write_text(json.dumps(data))
    template = TEMPLATE
    if template_text is not None:
        template = tmp / "template.yaml"
        template.write_text(template_text)
    return bp.build(template, bp.load_offers([d]), REGION)


def build_error(tmp: Path, change: Callable[[Offers], None] | None = None, template_text: str | None = None) -> str:
    offers = fixture_offers()
    if change:
        change(offers)
    with pytest.raises(bp.PriceBuildError) as e:
        build_from(tmp, offers, template_text)
    return str(e.value)


def sku_of(offers: Offers, code: str, **attrs: str) -> str:
    """The one fixture SKU of `code` with these attributes (productFamily among them)."""
    hits = [s for s, p in offers[code]["products"].items()
            if all((p.get("productFamily") if k == "productFamily" else p["attributes"].get(k)) == v for k, v in attrs.items())]
    assert len(hits) == 1, (code, attrs, hits)
    return hits[0]


def dims(offers: Offers, code: str, sku: str) -> list[dict[str, Any]]:
    (term,) = offers[code]["terms"]["OnDemand"][sku].values()
    return list(term["priceDimensions"].values())


C7I = {"productFamily": "Compute Instance", "instanceType": "c7i.large", "operatingSystem": "Linux", "tenancy": "Shared",
       "preInstalledSw": "NA", "capacitystatus": "Used"}


# ----------------------------------------------------------------------------- the builds
def test_fixture_offers_build_exactly_the_expected_table():
    built = bp.build(TEMPLATE, bp.load_offers([OFFERS]), REGION)
    assert built == (FIX / "expected.yaml").read_text()


def test_expected_table_has_the_figures_the_selectors_promise():
    """Read from the expected file, not from the code: the neighbours (Windows, Dedicated,
    gp2, archive snapshots, high-resolution alarms, free tiers) were not picked."""
    t = yaml.safe_load((FIX / "expected.yaml").read_text())
    assert t["ec2_hourly"] == {"c7i.large": 0.1008, "m7g.large": 0.1003, "t4g.medium": 0.0416}
    assert t["ebs"] == {"gp3_gb_month": 0.0912, "snapshot_gb_month": 0.05}
    assert t["s3"]["standard_gb_month"] == 0.025, "first of the tiered prices"
    assert t["route53"]["health_check_month"] == 0.5, "the free first 50 health checks are not the price"
    assert t["data_transfer"] == {"internet_out_gb": 0.126, "inter_az_gb": 0.02}, "no free tier; inter-AZ billed both ways"
    assert t["ssm"]["advanced_parameter_month"] == 0.05, "hourly price x 730"
    assert t["cloudwatch"]["alarm_month"] == 0.1 and t["vpc_endpoint"]["gateway_hour"] == 0.0
    assert t["date"] == "2026-11-20", "the newest publicationDate of the offer files"
    assert "/offers/v1.0/aws/AmazonEC2/20261120183012/ap-northeast-2/index.json" in t["source"]
    assert "/offers/v1.0/aws/AmazonRoute53/20260921190213/index.json" in t["source"], "Route 53 is a global offer"
    assert t["usage"]["nat_gb"] == 50 and t["budget"] == {"low": 500, "high": 1000}


def test_committed_table_is_the_build_of_its_template_and_committed_offers():
    out = io.StringIO()
    with redirect_stdout(out):
        rc = bp.main(["--region", REGION, "--check"])
    assert rc == 0, "tools/prices/ap-northeast-2.yaml is stale: run tools/build_prices.py\n" + out.getvalue()


def test_every_price_key_cost_py_reads_is_in_the_built_table():
    src = (ROOT / "tools" / "cost.py").read_text()
    read = set(re.findall(r'prices\["(\w+)"\]\["(\w+)"\]', src))
    tops = set(re.findall(r'prices\["(\w+)"\]', src)) | set(re.findall(r'prices\.get\("(\w+)"', src))
    assert len(read) >= 20 and {"usage", "budget", "hours_per_month"} <= tops, "the scan found cost.py's reads"
    for path in (FIX / "expected.yaml", ROOT / "tools" / "prices" / f"{REGION}.yaml"):
        t = yaml.safe_load(path.read_text())
        missing = sorted(f"{s}.{k}" for s, k in read if k not in t.get(s, {}))
        assert not missing, f"{path}: {missing}"
        assert not sorted(k for k in tops - {"overridden_by"} if k not in t), path
    priced = {r for r in read if r[0] not in bp.PLAIN_KEYS}
    assert priced <= set(bp.CATALOG), f"no selector in tools/build_prices.py CATALOG for {sorted(priced - set(bp.CATALOG))}"


def test_the_built_table_prices_a_plan():
    t = yaml.safe_load((FIX / "expected.yaml").read_text())
    res = [{"type": "aws:ec2/instance:Instance", "name": "a", "inputs": {"instanceType": "m7g.large", "tags": {"Role": "app"}}},
           {"type": "aws:ec2/natGateway:NatGateway", "name": "n", "inputs": {}}]
    c = costmod.monthly_cost(res, t)
    assert c["classes"]["ec2_instances"]["monthly"] == round(0.1003 * 730, 2)
    assert c["price_date"] == "2026-11-20"


def test_trimmed_copies_of_the_offers_rebuild_the_same_table(tmp_path):
    """What --fetch commits: only the SKUs the table used, and the same table from them."""
    offers = bp.load_offers([OFFERS])
    built = bp.build(TEMPLATE, offers, REGION)
    bp.write_trimmed(offers, tmp_path)
    assert bp.build(TEMPLATE, bp.load_offers([tmp_path]), REGION) == built
    ec2 = json.loads((tmp_path / "AmazonEC2.json").read_text())
    kinds = sorted((p["productFamily"], p["attributes"].get("instanceType") or p["attributes"]["usagetype"])
                   for p in ec2["products"].values())
    assert len(kinds) == 7 and ("Compute Instance", "c7i.large") in kinds, kinds
    assert set(ec2["terms"]) == {"OnDemand"} and set(ec2["terms"]["OnDemand"]) == set(ec2["products"])
    assert ec2["version"] == "20261120183012" and ec2["publicationDate"].startswith("2026-11-20")


def test_fetch_reads_the_region_index_and_the_global_route53_file(tmp_path, monkeypatch):
    """--fetch's download path, with the bulk API answered from the fixture files."""
    served: list[str] = []

    def urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        served.append(url)
        path = urllib.parse.urlparse(url).path
        m = re.fullmatch(r"/offers/v1\.0/aws/(\w+)/current/region_index\.json", path)
        if m:
            body = {"regions": {REGION: {"regionCode": REGION,
                                         "currentVersionUrl": f"/offers/v1.0/aws/{m[1]}/20261120183012/{REGION}/index.json"}}}
            return io.BytesIO(json.dumps(body).encode())
        m = re.fullmatch(rf"/offers/v1\.0/aws/(\w+)/(?:20261120183012/{REGION}|current)/index\.json", path)
        assert m, url
        return io.BytesIO((OFFERS / f"{m[1]}.json").read_bytes())

    monkeypatch.setattr(bp.urllib.request, "urlopen", urlopen)
    paths = bp.fetch(REGION, tmp_path / "cache")
    assert bp.build(TEMPLATE, bp.load_offers(paths), REGION) == (FIX / "expected.yaml").read_text()
    assert f"{bp.PRICING_BASE}/offers/v1.0/aws/AmazonRoute53/current/index.json" in served
    assert f"{bp.PRICING_BASE}/offers/v1.0/aws/AmazonEC2/current/region_index.json" in served
    assert f"{bp.PRICING_BASE}/offers/v1.0/aws/AmazonEC2/20261120183012/{REGION}/index.json" in served


def test_check_mode_shows_the_difference_of_a_stale_table(tmp_path):
    stale = tmp_path / "table.yaml"
    stale.write_text((FIX / "expected.yaml").read_text().replace("c7i.large: 0.1008", "c7i.large: 0.2"))
    out = io.StringIO()
    with redirect_stdout(out):
        rc = bp.main(["--template", str(TEMPLATE), "--offers", str(OFFERS), "--out", str(stale), "--check"])
    assert rc == 1 and "-  c7i.large: 0.2 " in out.getvalue() and "+  c7i.large: 0.1008 " in out.getvalue()


# ----------------------------------------------------------------------------- errors name the key and what was found
def test_two_skus_for_one_instance_type_is_an_error_naming_both(tmp_path):
    def twin(o: Offers) -> None:
        s = sku_of(o, "AmazonEC2", **C7I)
        o["AmazonEC2"]["products"]["TWINSKU000000000"] = dict(copy.deepcopy(o["AmazonEC2"]["products"][s]), sku="TWINSKU000000000")
        o["AmazonEC2"]["terms"]["OnDemand"]["TWINSKU000000000"] = o["AmazonEC2"]["terms"]["OnDemand"][s]

    msg = build_error(tmp_path, twin)
    s = sku_of(fixture_offers(), "AmazonEC2", **C7I)
    assert msg.startswith("ec2_hourly.c7i.large: 2 SKUs in ") and "expected one" in msg
    assert s in msg and "TWINSKU000000000" in msg and "instanceType=c7i.large" in msg


def test_an_instance_type_with_no_sku_is_an_error_naming_the_nearest(tmp_path):
    def gone(o: Offers) -> None:
        del o["AmazonEC2"]["products"][sku_of(o, "AmazonEC2", **C7I)]

    msg = build_error(tmp_path, gone)
    assert msg.startswith("ec2_hourly.c7i.large: no SKU in ") and "operatingSystem=Linux" in msg
    assert "nearest:" in msg and ("tenancy=Dedicated" in msg or "capacitystatus=UnusedCapacityReservation" in msg), msg


def test_an_unexpected_unit_is_an_error(tmp_path):
    def per_hour(o: Offers) -> None:
        dims(o, "AmazonEC2", sku_of(o, "AmazonEC2", productFamily="Storage", volumeApiName="gp3"))[0]["unit"] = "GB-Hrs"

    msg = build_error(tmp_path, per_hour)
    assert msg.startswith("ebs.gp3_gb_month: SKU ") and "priced per 'GB-Hrs'" in msg and "'GB-Mo'" in msg


def test_in_use_and_idle_public_ipv4_must_cost_the_same(tmp_path):
    def idle_dearer(o: Offers) -> None:
        dims(o, "AmazonVPC", sku_of(o, "AmazonVPC", usagetype="APN2-PublicIPv4:IdleAddress"))[0]["pricePerUnit"]["USD"] = "0.0075"

    msg = build_error(tmp_path, idle_dearer)
    assert msg.startswith("public_ipv4.hour: ") and "0.0075" in msg and "one figure for both" in msg


@pytest.mark.parametrize("change, expect", [
    (lambda o: o.pop("AWSBackup"), "backup.efs_warm_gb_month: needs the AWSBackup offer file"),
    (lambda o: dims(o, "AmazonS3", sku_of(o, "AmazonS3", volumeType="Standard"))[1].update(beginRange="60000"),
     "s3.standard_gb_month: SKU .* has tiers that do not cover 0-Inf once each"),
    (lambda o: dims(o, "AmazonEFS", sku_of(o, "AmazonEFS", storageClass="General Purpose"))[0].update(pricePerUnit={"CNY": "2.3"}),
     "efs.standard_gb_month: SKU .* has no USD price"),
    (lambda o: o["AmazonCloudWatch"]["terms"]["OnDemand"][sku_of(o, "AmazonCloudWatch", alarmType="Standard")].update(
        {"X.4NA7Y494T4": {"priceDimensions": {}}}), "cloudwatch.alarm_month: SKU .* has 2 OnDemand terms"),
    (lambda o: o["AWSSystemsManager"]["terms"]["OnDemand"].pop(sku_of(o, "AWSSystemsManager", group="Parameter Store",
                                                                       productFamily="AWS Systems Manager")),
     "ssm.advanced_parameter_month: SKU .* has no OnDemand term"),
    (lambda o: o["AmazonVPC"]["products"][sku_of(o, "AmazonVPC", usagetype="APN2-VpcEndpoint-Hours")]["attributes"].update(
        regionCode="ap-northeast-1"), "vpc_endpoint.interface_hour_per_az: no SKU .* nearest: .* has regionCode=ap-northeast-1"),
    (lambda o: o.update(AmazonRDS=dict(o["AWSBackup"], offerCode="AmazonRDS")), "offer files no key uses: AmazonRDS"),
])
def test_bad_offer_files_are_errors_naming_the_key(tmp_path, change, expect):
    assert re.search(expect, build_error(tmp_path, change)), expect


def test_every_broken_key_is_reported_at_once(tmp_path):
    def two(o: Offers) -> None:
        o.pop("AWSBackup")
        o["AmazonS3"]["products"].clear()

    msg = build_error(tmp_path, two)
    assert "backup.efs_warm_gb_month" in msg and "s3.standard_gb_month" in msg


def test_offer_file_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "AmazonS3.json").write_text((OFFERS / "AmazonS3.json").read_text())
    (tmp_path / "a" / "copy.json").write_text((OFFERS / "AmazonS3.json").read_text())
    with pytest.raises(bp.PriceBuildError, match="two offer files for AmazonS3"):
        bp.load_offers([tmp_path / "a"])
    (tmp_path / "b.json").write_text('{"offerCode": "AmazonS3"}')
    with pytest.raises(bp.PriceBuildError, match=r"b\.json: not an AWS Price List offer file \(missing version"):
        bp.load_offers([tmp_path / "b.json"])
    with pytest.raises(bp.PriceBuildError, match="no such offer file or directory"):
        bp.load_offers([tmp_path / "nowhere"])


@pytest.mark.parametrize("edit, expect", [
    (lambda t: t.replace("  m7g.large: ~", "  m7g.large: 0.1"), "ec2_hourly.m7g.large must be ~ .*not typed in"),
    (lambda t: t.replace("  gb_processed: ~\npublic_ipv4", "  gb_processed: ~\n  per_request: ~\npublic_ipv4"),
     "nat_gateway.per_request has no selector"),
    (lambda t: t.replace("  elastic_read_gb: ~\n", ""), "lacks efs.elastic_read_gb"),
    (lambda t: t.replace("budget:", "discounts: 0.1\nbudget:"), "unknown key 'discounts'"),
    (lambda t: t.replace("region: ap-northeast-2", "region: eu-west-1"), "region 'eu-west-1', but building 'ap-northeast-2'"),
])
def test_template_errors_name_the_key(tmp_path, edit, expect):
    assert re.search(expect, build_error(tmp_path, template_text=edit(TEMPLATE.read_text()))), expect


def test_a_failed_download_is_an_error_naming_the_offer(tmp_path, monkeypatch):
    def urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(bp.urllib.request, "urlopen", urlopen)
    with pytest.raises(bp.PriceBuildError, match=r"fetching AWSBackup \(https://pricing\.us-east-1\.amazonaws\.com/.*no route to host"):
        bp.fetch(REGION, tmp_path)
