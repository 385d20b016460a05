"""Build the price table tools/prices/<region>.yaml from AWS Price List offer files.

The offer files are the JSON files of the AWS Price List Bulk API (one per service and
region: AmazonEC2, AmazonVPC, AmazonEFS, ...). Each holds `products` keyed by SKU (a
`productFamily` and `attributes` such as regionCode, instanceType, operatingSystem,
tenancy, preInstalledSw, capacitystatus, licenseModel, usagetype) and
`terms.OnDemand[sku][offerTermCode].priceDimensions[*]` with `unit`, `beginRange`,
`endRange` and `pricePerUnit.USD`. CATALOG below says, for every price key that
tools/cost.py reads, which offer and which attributes select its one SKU.

The table's layout, comments, usage assumptions and budget live in
tools/prices/<region>.template.yaml: every `~` there is filled in from the offer files
(and `date`, `source` from the files' publicationDate and version). A key that matches
no SKU, or more than one, or a SKU with an unexpected unit, is an error that names the
key and what was found - never a silent pick.

    .venv/bin/python tools/build_prices.py            # rebuild from tools/prices/offers/<region>/
    .venv/bin/python tools/build_prices.py --check    # exit 1 (with a diff) if the table is stale
    .venv/bin/python tools/build_prices.py --offers DIR_OR_FILE ...   # other offer files
    .venv/bin/python tools/build_prices.py --fetch    # download the current offer files (network)

`--fetch` downloads the current files into build/price-offers/<region>/ and replaces
tools/prices/offers/<region>/ with trimmed copies (only the SKUs the table uses, a few
KB), so the committed table can always be rebuilt offline from committed inputs.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import re
import sys
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PRICES_DIR = ROOT / "tools" / "prices"
PRICING_BASE = "https://pricing.us-east-1.amazonaws.com"
NULL_TAG = "tag:yaml.org,2002:null"


class PriceBuildError(ValueError):
    pass


@dataclass(frozen=True)
class Offer:
    """An offer (service) of the Price List: regional (one file per region) or global."""

    code: str
    regional: bool
    pages: tuple[str, ...]  # the public pricing pages that show the same figures


OFFERS = {o.code: o for o in (
    Offer("AmazonEC2", True, ("https://aws.amazon.com/ec2/pricing/on-demand/", "https://aws.amazon.com/ebs/pricing/",
                              "https://aws.amazon.com/vpc/pricing/")),
    Offer("AmazonVPC", True, ("https://aws.amazon.com/vpc/pricing/",)),
    Offer("AmazonEFS", True, ("https://aws.amazon.com/efs/pricing/",)),
    Offer("AmazonS3", True, ("https://aws.amazon.com/s3/pricing/",)),
    Offer("AmazonRoute53", False, ("https://aws.amazon.com/route53/pricing/",)),
    Offer("AmazonCloudWatch", True, ("https://aws.amazon.com/cloudwatch/pricing/",)),
    Offer("AWSSystemsManager", True, ("https://aws.amazon.com/systems-manager/pricing/",)),
    Offer("AWSBackup", True, ("https://aws.amazon.com/backup/pricing/",)),
    Offer("AWSDataTransfer", True, ("https://aws.amazon.com/ec2/pricing/on-demand/#Data_Transfer",)),
)}


@dataclass(frozen=True)
class Sel:
    """Selects exactly one SKU of an offer, and how its price becomes the table's figure.

    usagetype is a regular expression matched against the whole usagetype after an
    optional region prefix ("APN2-"). attrs maps an attribute to its allowed values
    (None: the attribute may be absent). units are the price-dimension units accepted
    as they are; hourly_units are units of a monthly figure published per hour
    (multiplied by hours_per_month). times multiplies the price (a charge billed twice).
    same_as are further selectors that must price exactly the same (the table has one
    figure for both)."""

    offer: str
    units: tuple[str, ...]
    family: str | None = None
    usagetype: str | None = None
    attrs: Mapping[str, tuple[str | None, ...]] = field(default_factory=dict)
    hourly_units: tuple[str, ...] = ()
    times: int = 1
    same_as: tuple[Sel, ...] = ()


@dataclass(frozen=True)
class Const:
    """A figure no offer file carries, with the reason."""

    value: Decimal
    why: str


HOURS = ("Hrs",)
GB = ("GB",)
GB_MONTH = ("GB-Mo",)


def ec2_instance(itype: str) -> Sel:
    """On-demand Linux, shared tenancy, no pre-installed software, no licence, not a
    capacity reservation: the one price the table means by an instance type."""
    return Sel("AmazonEC2", HOURS, family="Compute Instance", attrs={
        "instanceType": (itype,), "operatingSystem": ("Linux",), "tenancy": ("Shared",), "preInstalledSw": ("NA",),
        "capacitystatus": ("Used",), "licenseModel": ("No License required",), "marketoption": ("OnDemand", None)})


# Every price key tools/cost.py reads besides ec2_hourly.<type> (see ec2_instance).
CATALOG: dict[tuple[str, str], Sel | Const] = {
    ("ebs", "gp3_gb_month"): Sel("AmazonEC2", GB_MONTH, family="Storage", attrs={"volumeApiName": ("gp3",)}),
    ("ebs", "snapshot_gb_month"): Sel("AmazonEC2", GB_MONTH, family="Storage Snapshot", usagetype="EBS:SnapshotUsage"),
    ("nat_gateway", "hour"): Sel("AmazonEC2", HOURS, family="NAT Gateway", usagetype="NatGateway-Hours"),
    ("nat_gateway", "gb_processed"): Sel("AmazonEC2", GB, family="NAT Gateway", usagetype="NatGateway-Bytes"),
    # In use or idle, an Elastic IP is billed as a public IPv4 address.
    ("public_ipv4", "hour"): Sel("AmazonVPC", HOURS, usagetype=r"PublicIPv4:InUseAddress",
                                 same_as=(Sel("AmazonVPC", HOURS, usagetype=r"PublicIPv4:IdleAddress"),)),
    ("vpc_endpoint", "interface_hour_per_az"): Sel("AmazonVPC", HOURS, family="VpcEndpoint", usagetype="VpcEndpoint-Hours"),
    ("vpc_endpoint", "interface_gb_processed"): Sel("AmazonVPC", GB, family="VpcEndpoint", usagetype="VpcEndpoint-Bytes"),
    ("vpc_endpoint", "gateway_hour"): Const(Decimal("0"), "gateway endpoints (S3, DynamoDB) are not billed: no SKU"),
    ("efs", "standard_gb_month"): Sel("AmazonEFS", GB_MONTH, family="Storage", usagetype="TimedStorage-ByteHrs"),
    ("efs", "elastic_read_gb"): Sel("AmazonEFS", GB, usagetype=r"ElasticThroughput-?Read.*"),
    ("efs", "elastic_write_gb"): Sel("AmazonEFS", GB, usagetype=r"ElasticThroughput-?Write.*"),
    ("s3", "standard_gb_month"): Sel("AmazonS3", GB_MONTH, family="Storage", usagetype="TimedStorage-ByteHrs",
                                     attrs={"volumeType": ("Standard",)}),
    ("route53", "hosted_zone_month"): Sel("AmazonRoute53", ("HostedZone", "Mo"), family="DNS Zone", usagetype="HostedZone"),
    ("route53", "health_check_month"): Sel("AmazonRoute53", ("Health-Check", "Mo"), family="DNS Health Check",
                                           usagetype="Health-Check-AWS"),
    ("route53", "health_check_option_month"): Sel("AmazonRoute53", ("Health-Check", "Mo"), family="DNS Health Check",
                                                  usagetype="Health-Check-Option-AWS"),
    ("cloudwatch", "alarm_month"): Sel("AmazonCloudWatch", ("Alarms", "Mo"), family="Alarm", usagetype="CW:AlarmMonitorUsage"),
    ("vpn", "connection_hour"): Sel("AmazonVPC", HOURS, family="Cloud Connectivity", usagetype=r"VPN-Usage-Hours:ipsec\.1"),
    ("transit_gateway", "attachment_hour"): Sel("AmazonVPC", HOURS, usagetype="TransitGateway-Hours",
                                                attrs={"operation": ("TransitGatewayVPC",)}),
    ("transit_gateway", "gb_processed"): Sel("AmazonVPC", GB, usagetype="TransitGateway-Bytes",
                                             attrs={"operation": ("TransitGatewayVPC",)}),
    ("backup", "efs_warm_gb_month"): Sel("AWSBackup", GB_MONTH, family="AWS Backup Storage", usagetype="WarmStorage-ByteHrs-EFS"),
    # Published per parameter-hour (prorated); the table holds the month.
    ("ssm", "advanced_parameter_month"): Sel("AWSSystemsManager", ("Mo",), usagetype="PS-Advanced-Param-Tier1",
                                             hourly_units=HOURS),
    ("data_transfer", "internet_out_gb"): Sel("AWSDataTransfer", GB, usagetype="DataTransfer-Out-Bytes",
                                              attrs={"transferType": ("AWS Outbound",)}),
    # Billed once out of one AZ and once into the other.
    ("data_transfer", "inter_az_gb"): Sel("AWSDataTransfer", GB, usagetype="DataTransfer-Regional-Bytes",
                                          attrs={"transferType": ("IntraRegion",)}, times=2),
}
PRICE_SECTIONS = {"ec2_hourly"} | {s for s, _ in CATALOG}
PLAIN_KEYS = {"region", "currency", "hours_per_month", "usage", "budget"}
FILLED_KEYS = {"date", "source"}
# Region attribute per offer: data transfer names the region it leaves.
REGION_ATTR = {"AWSDataTransfer": "fromRegionCode"}


# ----------------------------------------------------------------------------- offer files
@dataclass
class OfferFile:
    path: Path
    data: dict[str, Any]
    used: set[str] = field(default_factory=set)
    _by_family: dict[str, list[tuple[str, dict[str, Any]]]] | None = None

    @property
    def code(self) -> str:
        return str(self.data["offerCode"])

    def products(self, family: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """All products, or those of one productFamily."""
        if family is None:
            return list(self.data["products"].items())
        if self._by_family is None:
            self._by_family = {}
            for sku, p in self.data["products"].items():
                self._by_family.setdefault(str(p.get("productFamily")), []).append((sku, p))
        return self._by_family.get(family, [])


def load_offers(paths: Iterable[Path]) -> dict[str, OfferFile]:
    """Offer files by offerCode, from files and directories (their *.json)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise PriceBuildError(f"{p}: no offer files (*.json) in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise PriceBuildError(f"{p}: no such offer file or directory")
    offers: dict[str, OfferFile] = {}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise PriceBuildError(f"{f}: not a JSON offer file ({e})") from e
        missing = [k for k in ("offerCode", "version", "publicationDate", "products", "terms") if k not in data]
        if not isinstance(data, dict) or missing:
            raise PriceBuildError(f"{f}: not an AWS Price List offer file (missing {', '.join(missing) or 'everything'})")
        of = OfferFile(f, data)
        if of.code in offers:
            raise PriceBuildError(f"two offer files for {of.code}: {offers[of.code].path} and {f}; pass one")
        offers[of.code] = of
    return offers


# ----------------------------------------------------------------------------- selection
def _criteria(sel: Sel, region: str) -> list[tuple[str, Any]]:
    """(name, test) pairs; a test takes a product and returns the value it saw or None if it passed."""
    crit: list[tuple[str, Any]] = []
    if sel.family is not None:
        crit.append((f"productFamily={sel.family}", lambda p: None if p.get("productFamily") == sel.family
                     else f"productFamily={p.get('productFamily')}"))
    if OFFERS[sel.offer].regional:
        ra = REGION_ATTR.get(sel.offer, "regionCode")
        crit.append((f"{ra}={region}", lambda p: None if p.get("attributes", {}).get(ra) == region
                     else f"{ra}={p.get('attributes', {}).get(ra)}"))
    for a, allowed in sorted(sel.attrs.items()):
        shown = "|".join("(absent)" if v is None else v for v in allowed)
        crit.append((f"{a}={shown}", lambda p, a=a, allowed=allowed: None if p.get("attributes", {}).get(a) in allowed
                     else f"{a}={p.get('attributes', {}).get(a, '(absent)')}"))
    if sel.usagetype is not None:
        rx = re.compile(rf"(?:[A-Z]{{2,4}}[0-9]?-)?(?:{sel.usagetype})")
        crit.append((f"usagetype~{sel.usagetype}", lambda p: None if rx.fullmatch(p.get("attributes", {}).get("usagetype", ""))
                     else f"usagetype={p.get('attributes', {}).get('usagetype')}"))
    return crit


def _describe(p: dict[str, Any]) -> str:
    a = p.get("attributes", {})
    keys = ("instanceType", "operatingSystem", "tenancy", "preInstalledSw", "capacitystatus", "licenseModel", "marketoption",
            "volumeApiName", "volumeType", "usagetype", "operation", "transferType")
    return ", ".join([f"productFamily={p.get('productFamily')}"] + [f"{k}={a[k]}" for k in keys if k in a])


def select(key: str, sel: Sel, offers: Mapping[str, OfferFile], region: str) -> tuple[OfferFile, str]:
    """The one SKU `sel` selects, or an error naming the key and what was found."""
    if sel.offer not in offers:
        raise PriceBuildError(f"{key}: needs the {sel.offer} offer file, which was not given")
    of = offers[sel.offer]
    crit = _criteria(sel, region)
    pool = of.products(sel.family)
    itypes = sel.attrs.get("instanceType")
    if itypes:
        pool = [(s, p) for s, p in pool if p.get("attributes", {}).get("instanceType") in itypes]
    hits = [(s, p) for s, p in pool if all(t(p) is None for _, t in crit)]
    wanted = ", ".join(n for n, _ in crit)
    if len(hits) > 1:
        found = "; ".join(f"{s} ({_describe(p)})" for s, p in hits[:6])
        raise PriceBuildError(f"{key}: {len(hits)} SKUs in {of.path} match {wanted}, expected one: {found}")
    if not hits:
        near: list[tuple[int, str, list[str]]] = []
        for s, p in of.products():
            misses = [m for _, t in crit if (m := t(p)) is not None]
            near.append((len(misses), s, misses))
        best = min((n for n, _, _ in near), default=0)
        hint = ""
        if near and best <= 2:
            close = [f"{s} has {', '.join(m)}" for n, s, m in sorted(near) if n == best][:3]
            hint = "; nearest: " + "; ".join(close)
        raise PriceBuildError(f"{key}: no SKU in {of.path} matches {wanted}{hint}")
    return of, hits[0][0]


def _dec(x: Any, what: str) -> Decimal:
    try:
        return Decimal("Infinity") if x == "Inf" else Decimal(str(x))
    except InvalidOperation as e:
        raise PriceBuildError(f"{what}: not a number: {x!r}") from e


def price(key: str, sel: Sel, of: OfferFile, sku: str, hours_per_month: Decimal) -> Decimal:
    """The SKU's on-demand USD price in the table's unit. Tiered prices: the first tier
    that is not a free allowance (the table prices no free tier)."""
    terms = of.data["terms"].get("OnDemand", {}).get(sku)
    where = f"{key}: SKU {sku} in {of.path}"
    if not terms:
        raise PriceBuildError(f"{where} has no OnDemand term")
    if len(terms) != 1:
        raise PriceBuildError(f"{where} has {len(terms)} OnDemand terms ({', '.join(sorted(terms))}), expected one")
    dims = list(next(iter(terms.values())).get("priceDimensions", {}).values())
    if not dims:
        raise PriceBuildError(f"{where} has no price dimensions")
    units = sorted({str(d.get("unit")) for d in dims})
    if len(units) != 1:
        raise PriceBuildError(f"{where} mixes units {units}")
    unit = units[0]
    if unit not in sel.units + sel.hourly_units:
        raise PriceBuildError(f"{where} is priced per {unit!r}; {key} expects {' or '.join(repr(u) for u in sel.units + sel.hourly_units)}")
    tiers = []
    for d in dims:
        if "USD" not in d.get("pricePerUnit", {}):
            raise PriceBuildError(f"{where} has no USD price ({d.get('pricePerUnit')})")
        tiers.append((_dec(d.get("beginRange", "0"), where), _dec(d.get("endRange", "Inf"), where),
                      _dec(d["pricePerUnit"]["USD"], where)))
    tiers.sort()
    begins = [b for b, _, _ in tiers]
    if begins[0] != 0 or len(set(begins)) != len(begins) or tiers[-1][1] != Decimal("Infinity") \
            or any(tiers[i][1] != tiers[i + 1][0] for i in range(len(tiers) - 1)):
        shown = ", ".join(f"{b}-{e}: {p}" for b, e, p in tiers)
        raise PriceBuildError(f"{where} has tiers that do not cover 0-Inf once each: {shown}")
    value = next((p for _, _, p in tiers if p != 0), Decimal(0))
    if unit in sel.hourly_units:
        value = (value * hours_per_month).quantize(Decimal("0.000001"))
    of.used.add(sku)
    return value * sel.times


def resolve(key: str, entry: Sel | Const, offers: Mapping[str, OfferFile], region: str, hours: Decimal) -> Decimal:
    if isinstance(entry, Const):
        return entry.value
    of, sku = select(key, entry, offers, region)
    value = price(key, entry, of, sku, hours)
    for other in entry.same_as:
        of2, sku2 = select(key, other, offers, region)
        v2 = price(key, other, of2, sku2, hours)
        if v2 != value:
            raise PriceBuildError(f"{key}: SKU {sku} prices {value} but SKU {sku2} ({other.usagetype}) prices {v2}; "
                                  "the table has one figure for both")
    return value


# ----------------------------------------------------------------------------- template and output
def _fmt(d: Decimal) -> str:
    s = format(d.normalize(), "f")
    return s if "." in s else s + ".0"


def _placeholders(text: str, src: str) -> tuple[dict[str, Any], list[tuple[tuple[str, ...], yaml.Node]]]:
    """The template's data and its `~` leaves with their paths, after checking its keys."""
    data = yaml.safe_load(text)
    root = yaml.compose(text)
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise PriceBuildError(f"{src}: a mapping of table keys")
    holes: list[tuple[tuple[str, ...], yaml.Node]] = []
    errors: list[str] = []
    for k, v in root.value:
        top = str(k.value)
        if top not in PLAIN_KEYS | FILLED_KEYS | PRICE_SECTIONS:
            errors.append(f"{src}: unknown key {top!r} (allowed: {', '.join(sorted(PLAIN_KEYS | FILLED_KEYS | PRICE_SECTIONS))})")
        elif top in PRICE_SECTIONS and not (isinstance(v, yaml.MappingNode) and v.value):
            errors.append(f"{src}: {top} must be a mapping of price keys, each ~")
        elif top in FILLED_KEYS or top in PRICE_SECTIONS:
            leaves: list[tuple[tuple[str, ...], yaml.Node]] = (
                [((top,), v)] if top in FILLED_KEYS else [((top, str(k2.value)), v2) for k2, v2 in v.value])
            for path, node in leaves:
                if node.tag != NULL_TAG or text[node.start_mark.index:node.end_mark.index] != "~":
                    errors.append(f"{src}: {'.'.join(path)} must be ~ (filled from the offer files), not typed in")
                elif len(path) == 2 and path[0] != "ec2_hourly" and path not in CATALOG:
                    errors.append(f"{src}: {'.'.join(path)} has no selector in tools/build_prices.py CATALOG")
                else:
                    holes.append((path, node))
    for need in sorted(FILLED_KEYS | {".".join(p) for p in CATALOG} | {"region", "hours_per_month", "usage", "budget"}):
        section, _, sub = need.partition(".")
        if section not in data or (sub and not isinstance(data[section], dict)) or (sub and sub not in data[section]):
            errors.append(f"{src}: lacks {need} (tools/cost.py reads it)")
    if errors:
        raise PriceBuildError("\n".join(errors))
    return data, holes


def source_of(offers: Mapping[str, OfferFile], region: str) -> str:
    parts = []
    for code in sorted(offers, key=list(OFFERS).index):
        d = offers[code].data
        day = str(d["publicationDate"])[:10]
        if d.get("transcribedFrom"):
            parts.append(f"{' and '.join(d['transcribedFrom'])} ({code}: seed offer file transcribed {day})")
        else:
            parts.append(f"{offer_url(code, str(d['version']), region)} ({code} version {d['version']}, published {day})")
    return "; ".join(parts)


def offer_url(code: str, version: str, region: str) -> str:
    if OFFERS[code].regional:
        return f"{PRICING_BASE}/offers/v1.0/aws/{code}/{version}/{region}/index.json"
    return f"{PRICING_BASE}/offers/v1.0/aws/{code}/{version}/index.json"


def header(template: Path, region: str) -> str:
    try:
        name = str(template.resolve().relative_to(ROOT))
    except ValueError:
        name = str(template)
    return (f"# GENERATED by tools/build_prices.py from {name} and the AWS Price List\n"
            "# offer files named in `source`. Do not edit the figures here: edit the template (layout,\n"
            "# comments, usage, budget) and regenerate (docs/cost.md, \"Refreshing prices\"):\n"
            f"#   .venv/bin/python tools/build_prices.py --region {region}            # from tools/prices/offers/{region}/\n"
            f"#   .venv/bin/python tools/build_prices.py --region {region} --fetch    # from AWS's current offer files\n")


def build(template: Path, offers: Mapping[str, OfferFile], region: str) -> str:
    """The table's text: the template with every `~` filled, and the generated header."""
    text = template.read_text()
    data, holes = _placeholders(text, str(template))
    if data["region"] != region:
        raise PriceBuildError(f"{template}: region {data['region']!r}, but building {region!r}")
    used_offers = {e.offer for e in CATALOG.values() if isinstance(e, Sel)} | {"AmazonEC2"}
    unknown = sorted(set(offers) - used_offers)
    if unknown:
        raise PriceBuildError(f"offer files no key uses: {', '.join(unknown)} (known: {', '.join(sorted(used_offers))})")
    hours = _dec(data["hours_per_month"], f"{template}: hours_per_month")
    values: dict[tuple[str, ...], str] = {}
    errors: list[str] = []
    for path, _ in holes:
        if path in (("date",), ("source",)):
            continue
        key = ".".join(path)
        entry = ec2_instance(path[1]) if path[0] == "ec2_hourly" else CATALOG[(path[0], path[1])]
        try:
            values[path] = _fmt(resolve(key, entry, offers, region, hours))
        except PriceBuildError as e:
            errors.append(str(e))
    if errors:
        raise PriceBuildError("\n".join(errors))
    used = {of.code for of in offers.values() if of.used}
    if not used:
        raise PriceBuildError("no price came from an offer file")
    unused = sorted(set(offers) - used)
    if unused:
        raise PriceBuildError(f"offer files given but no key priced from them: {', '.join(unused)}")
    dates = sorted(str(of.data["publicationDate"])[:10] for of in offers.values())
    values[("date",)] = json.dumps(dates[-1])
    values[("source",)] = json.dumps(source_of(offers, region))
    out = text
    for path, node in sorted(holes, key=lambda h: -h[1].start_mark.index):
        start, end, value = node.start_mark.index, node.end_mark.index, values[path]
        pad = re.match(r" *(?=#)", out[end:])  # keep a trailing comment in its column
        if pad:
            end += pad.end()
            value += " " * max(1, pad.end() - len(value) + 1)
        out = out[:start] + value + out[end:]
    body = "".join(line for line in out.splitlines(keepends=True) if not line.startswith("##"))
    result = header(template, region) + "#\n" + body
    _self_check(result, data, values)
    return result


def _self_check(result: str, data: dict[str, Any], values: dict[tuple[str, ...], str]) -> None:
    expect = copy.deepcopy(data)
    for path, v in values.items():
        parsed = yaml.safe_load(v)
        if len(path) == 1:
            expect[path[0]] = parsed
        else:
            expect[path[0]][path[1]] = parsed
    if yaml.safe_load(result) != expect:
        raise PriceBuildError("internal error: the rendered table does not parse back to the built figures")


# ----------------------------------------------------------------------------- fetch and trim
def fetch(region: str, dest: Path) -> list[Path]:
    """Download the current offer files of every offer the catalog uses (network)."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for code in sorted({e.offer for e in CATALOG.values() if isinstance(e, Sel)} | {"AmazonEC2"}):
        url = f"{PRICING_BASE}/offers/v1.0/aws/{code}/current/index.json"
        try:
            if OFFERS[code].regional:
                index_url = f"{PRICING_BASE}/offers/v1.0/aws/{code}/current/region_index.json"
                with urllib.request.urlopen(index_url, timeout=60) as r:
                    regions = json.load(r).get("regions", {})
                if region not in regions:
                    raise PriceBuildError(f"{index_url}: no {region} file for {code} (regions: {', '.join(sorted(regions))})")
                url = PRICING_BASE + regions[region]["currentVersionUrl"]
            out = dest / f"{code}.json"
            print(f"fetching {url}", file=sys.stderr)
            with urllib.request.urlopen(url, timeout=600) as r, out.open("wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except (OSError, ValueError, KeyError) as e:
            raise PriceBuildError(f"fetching {code} ({url}): {e}") from e
        paths.append(out)
    return paths


def trimmed(of: OfferFile) -> dict[str, Any]:
    """The offer file with only the SKUs the table used (the evidence for its figures)."""
    d = of.data
    keep = {k: d[k] for k in ("formatVersion", "disclaimer", "offerCode", "version", "publicationDate") if k in d}
    if d.get("transcribedFrom"):
        keep["transcribedFrom"] = d["transcribedFrom"]
    keep["products"] = {s: d["products"][s] for s in sorted(of.used)}
    keep["terms"] = {"OnDemand": {s: d["terms"]["OnDemand"][s] for s in sorted(of.used)}}
    return keep


def write_trimmed(offers: Mapping[str, OfferFile], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.json"):
        old.unlink()
    for code, of in sorted(offers.items()):
        (dest / f"{code}.json").write_text(json.dumps(trimmed(of), indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", default="ap-northeast-2")
    ap.add_argument("--template", type=Path, help="default: tools/prices/<region>.template.yaml")
    ap.add_argument("--offers", type=Path, nargs="+", help="offer files or directories (default: tools/prices/offers/<region>/)")
    ap.add_argument("--out", help="default: tools/prices/<region>.yaml; - for stdout")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff if the table differs")
    ap.add_argument("--fetch", action="store_true",
                    help="download the current offer files to build/price-offers/<region>/ and keep trimmed copies "
                         "in tools/prices/offers/<region>/")
    a = ap.parse_args(argv)
    template = a.template or PRICES_DIR / f"{a.region}.template.yaml"
    out = Path(a.out) if a.out and a.out != "-" else PRICES_DIR / f"{a.region}.yaml"
    committed = PRICES_DIR / "offers" / a.region
    try:
        if a.fetch and a.offers:
            raise PriceBuildError("--fetch downloads the offer files; do not also pass --offers")
        paths = fetch(a.region, ROOT / "build" / "price-offers" / a.region) if a.fetch else (a.offers or [committed])
        offers = load_offers(paths)
        table = build(template, offers, a.region)
    except PriceBuildError as e:
        print(f"build_prices: {e}", file=sys.stderr)
        return 2
    if a.check:
        current = out.read_text() if out.exists() else ""
        if current != table:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), table.splitlines(True), str(out), "built"))
            print(f"{out} is not the build of its template and offer files: run tools/build_prices.py", file=sys.stderr)
            return 1
        return 0
    if a.fetch:
        write_trimmed(offers, committed)
    if a.out == "-":
        sys.stdout.write(table)
    else:
        out.write_text(table)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
