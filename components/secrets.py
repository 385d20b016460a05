"""Secrets: generated once with pulumi-random (or taken from secret config when the user
set them), stored as SSM SecureString parameters under `/<project>/<stack>/secrets/`,
read by the hosts at boot through their instance role. Nothing here ever reaches
user-data or a plain output: only the parameter names are exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random
import pulumi_tls as tls

from .config import StackConfig

# name -> password length (alphanumeric: these end up in config files and URLs)
GENERATED_PASSWORDS = {
    "redis_password": 40,
    "mariadb_root_password": 40,
    "mariadb_app_password": 40,
    "mariadb_slurm_password": 40,
    "galera_sst_password": 40,
    "clustercheck_password": 32,
    "grafana_admin_password": 32,
}
MUNGE_KEY_BYTES = 1024


@dataclass
class SecretsArgs:
    cfg: StackConfig
    config: pulumi.Config  # the project's config: secrets the user set win over generated ones
    tls_names: list[str]  # names of the self-signed certificate (stacks without configured TLS)
    tags: dict[str, str]


class Secrets(pulumi.ComponentResource):
    parameters: dict[str, aws.ssm.Parameter]

    def __init__(self, name: str, args: SecretsArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:secrets:Secrets", name, None, opts)
        cfg, config, tls_names, tags = args.cfg, args.config, args.tls_names, args.tags
        child = pulumi.ResourceOptions(parent=self)
        protected = pulumi.ResourceOptions(parent=self, protect=True)
        values: dict[str, pulumi.Output[str]] = {}

        for key, length in GENERATED_PASSWORDS.items():
            given = config.get_secret(key)
            if given is not None:
                values[key] = given
            else:
                values[key] = random.RandomPassword(f"{name}-{key}", length=length, special=False,
                                                    opts=protected).result

        given_munge = config.get_secret("munge_key")  # base64, e.g. the existing cluster's key
        if given_munge is not None:
            values["munge_key"] = given_munge
        else:
            values["munge_key"] = random.RandomBytes(f"{name}-munge-key", length=MUNGE_KEY_BYTES,
                                                     opts=protected).base64

        cert = config.get_secret("tls_cert")
        cert_key = config.get_secret("tls_key")
        if cert is not None and cert_key is not None:
            values["tls_pem"] = pulumi.Output.concat(cert, "\n", cert_key, "\n")
        else:
            # Non-prod stacks only (config validation refuses this for prod): a
            # self-signed certificate generated once, shared by both LBs.
            pk = tls.PrivateKey(f"{name}-tls-key", algorithm="ECDSA", ecdsa_curve="P256", opts=protected)
            self_signed = tls.SelfSignedCert(
                f"{name}-tls-cert",
                private_key_pem=pk.private_key_pem,
                subject={"common_name": tls_names[0], "organization": cfg.project},
                dns_names=tls_names,
                validity_period_hours=24 * 365,
                early_renewal_hours=24 * 30,
                allowed_uses=["key_encipherment", "digital_signature", "server_auth"],
                opts=child,
            )
            pem: pulumi.Output[str] = pulumi.Output.concat(self_signed.cert_pem, pk.private_key_pem)
            values["tls_pem"] = pulumi.Output.secret(pem)  # type: ignore[arg-type]

        slack = config.get_secret("slack_webhook_url")
        if slack is not None:
            values["slack_webhook_url"] = slack

        self.path = f"{cfg.ssm_path}/secrets"
        self.parameters = {}
        for key_name in sorted(values):
            self.parameters[key_name] = aws.ssm.Parameter(
                f"{name}-{key_name}",
                name=f"{self.path}/{key_name}",
                type="SecureString",
                value=pulumi.Output.secret(values[key_name]),  # type: ignore[arg-type]
                tier="Advanced" if key_name in ("munge_key", "tls_pem") else "Standard",
                description=f"{cfg.project} {cfg.stack} {key_name} (read by hosts at boot)",
                tags={**tags, "Name": key_name},
                opts=protected,
            )
        self.register_outputs({"path": self.path})
