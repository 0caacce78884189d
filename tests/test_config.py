"""Site config: loading, hostlist expansion, and errors that name the file and the field."""

from pathlib import Path

import pytest
import yaml

from provisioner import config
from provisioner.errors import ConfigError
from provisioner.model import normalize_mac
from testbed.process import ROOT
from testbed.site import mac, write_site


def rewrite(path: Path, edit) -> Path:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert str(path) in str(exc.value)
    return exc.value


def test_example_site_loads():
    site = config.load(ROOT / "examples" / "site.yaml")
    assert list(site.nodes)[:2] == ["cn01", "cn02"]
    sn03 = site.nodes["sn03"]
    assert sn03.pool == "shared" and sn03.default_role == "slurm"
    assert sn03.macs == ("52:54:00:00:03:03",)
    assert sn03.ip == "10.0.3.3" and sn03.bmc.address == "10.0.103.3"
    assert sn03.bmc.password == "changeme"
    assert site.images["k8s"].initrds == ("k8s/initrd.img",)


def test_hostlist_groups_spread_per_node_values(tmp_path):
    path = write_site(tmp_path, nodes=[
        {"name": "gpu[08-10]", "pool": "shared", "macs": [mac(1), mac(2), [mac(3), mac(4)]],
         "ip": "10.9.0.[8-10]", "bmc": {"address": "127.0.0.1", "port": "[9001-9003]"}},
    ])
    site = config.load(path)
    assert list(site.nodes) == ["gpu08", "gpu09", "gpu10"]
    assert site.nodes["gpu10"].macs == (mac(3), mac(4))
    assert [n.bmc.port for n in site.nodes.values()] == [9001, 9002, 9003]
    assert site.nodes["gpu09"].ip == "10.9.0.9"
    assert site.node_by_mac()[mac(4)].name == "gpu10"


@pytest.mark.parametrize("spelling", ["52:54:00:AB:cd:01", "52-54-00-ab-CD-01", "525400abcd01", "5254.00ab.cd01"])
def test_mac_spellings_normalize(spelling):
    assert normalize_mac(spelling) == "52:54:00:ab:cd:01"


@pytest.mark.parametrize("bad", ["", "52:54:00", "zz:54:00:ab:cd:01", "52:54:00:ab:cd:01:02", "x" * 500, None, 7])
def test_bad_macs_are_rejected(bad):
    assert normalize_mac(bad) is None


@pytest.mark.parametrize("edit, field, words", [
    (lambda d: d["nodes"][1]["macs"].__setitem__(2, d["nodes"][0]["macs"][0]),
     "nodes[1].macs[2]", "duplicate MAC"),
    (lambda d: d["nodes"][1].__setitem__("name", "sn[01-"), "nodes[1].name", "bad hostlist"),
    (lambda d: d["nodes"][1].__setitem__("default_role", "gpu"), "nodes[1].default_role", "must be one of"),
    (lambda d: d["nodes"][0].__setitem__("pool", "batch"), "nodes[0].pool", "must be one of"),
    (lambda d: d["nodes"].append({"name": "sn02", "pool": "shared", "mac": mac(9),
                                  "bmc": {"address": "x"}}), "nodes[2].name", "duplicate node name sn02"),
    (lambda d: d["nodes"].append({"name": "sn09", "pool": "shared", "mac": mac(9), "ip": "10.0.3.2",
                                  "bmc": {"address": "x"}}), "nodes[2].ip", "duplicate IP"),
    (lambda d: (d.pop("defaults"), d["nodes"][1].pop("bmc")), "nodes[1].bmc", "needs a BMC"),
    (lambda d: d["images"]["k8s"].__setitem__("kernel", "k8s/nope"), "images.k8s.kernel", "does not exist"),
    (lambda d: d["images"]["k8s"].__setitem__("kernel", "../../etc/passwd"), "images.k8s.kernel", "inside"),
    (lambda d: d["images"].pop("k8s"), "images.k8s", "is required"),
    (lambda d: d["nodes"][0].__setitem__("colour", "red"), "nodes[0].colour", "unknown field"),
    (lambda d: d["nodes"][1].__setitem__("ip", "10.0.3.[1-3]"), "nodes[1].ip", "expands to 3 values for 4"),
    (lambda d: d["nodes"][1].__setitem__("macs", [mac(1)]), "nodes[1].macs", "1 entries for 4 node(s)"),
    (lambda d: d["nodes"][1].__setitem__("macs", [mac(1), mac(2), mac(3), "nope"]), "nodes[1].macs[3]", "not a MAC"),
    (lambda d: d["policy"].__setitem__("cooldown_s", "soon") if "policy" in d else d.__setitem__(
        "policy", {"cooldown_s": "soon"}), "policy.cooldown_s", "whole number"),
    (lambda d: d.__setitem__("slurm", {"mode": "ssh"}), "slurm.controller", "required when slurm.mode is ssh"),
    (lambda d: d["site"].__setitem__("boot_url", "ftp://x"), "site.boot_url", "http"),
    (lambda d: d["nodes"][1].__setitem__("pool", "k8s"), "nodes[1].default_role", "only have role k8s"),
    (lambda d: d.setdefault("kubernetes", {}).__setitem__("booking_s", 0), "kubernetes.booking_s", "must be >= 1"),
])
def test_config_errors_name_the_field(tmp_path, edit, field, words):
    path = rewrite(write_site(tmp_path), edit)
    err = load_error(path)
    assert err.field == field, str(err)
    assert words in str(err)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text("site: [unclosed\n")
    err = load_error(p)
    assert "not valid YAML" in str(err) and "line" in err.field
    err = load_error(tmp_path / "nope.yaml")
    assert "--config" in str(err)


def test_password_never_in_repr(tmp_path):
    site = config.load(write_site(tmp_path))
    assert "s3cret-bmc-pw" not in repr(site)
    assert "s3cret-bmc-pw" not in repr(site.nodes["sn01"])


def test_bmc_protocol_redfish_and_its_fields(tmp_path):
    ca = tmp_path / "bmc-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")

    def edit(d):
        d["nodes"][1]["bmc"] = {"protocol": "redfish", "address": "10.0.9.[1-4]", "ca_file": str(ca),
                                "system": "sys-[1-4]", "boot_mode": "legacy",
                                "http_boot_uri": "http://10.0.0.1:8080/ipxe.efi"}

    site = config.load(rewrite(write_site(tmp_path), edit))
    cn, sn = site.nodes["cn01"].bmc, site.nodes["sn03"].bmc
    assert (cn.protocol, cn.port) == ("ipmi", 623)  # IPMI stays the default
    assert (sn.protocol, sn.port, sn.address, sn.system, sn.ca_file, sn.insecure, sn.boot_mode) == (
        "redfish", 443, "10.0.9.3", "sys-3", str(ca), False, "legacy")
    assert sn.password == "s3cret-bmc-pw" and "s3cret" not in repr(sn)  # from the file, as for IPMI
    assert site.power.settle_s == 30.0


@pytest.mark.parametrize("bmc, field, words", [
    ({"protocol": "redfish", "ca_file": "ca.pem", "insecure": True}, "nodes[0].bmc.insecure", "not both"),
    ({"insecure": True}, "nodes[0].bmc.insecure", "is for protocol: redfish"),
    ({"protocol": "snmp"}, "nodes[0].bmc.protocol", "must be one of ipmi, redfish"),
    ({"protocol": "redfish", "ca_file": "missing.pem"}, "nodes[0].bmc.ca_file", "does not exist"),
    ({"protocol": "redfish", "http_boot_uri": "tftp://x"}, "nodes[0].bmc.http_boot_uri", "http(s) URL"),
])
def test_bmc_redfish_errors_name_the_field(tmp_path, bmc, field, words):
    (tmp_path / "ca.pem").write_text("x")
    path = rewrite(write_site(tmp_path), lambda d: d["nodes"][0]["bmc"].update(bmc))
    err = load_error(path)
    assert err.field == field, str(err)
    assert words in str(err)
