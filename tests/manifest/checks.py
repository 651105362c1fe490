"""The checks every generated manifest passes: KubeVirt's and CDI's own OpenAPI definitions (../shared/schemas,
validated with jsonschema, unknown fields refused), the admission rules those do not encode, and the Control
Plane workload's documented field names (its Terraform provider's ``client/workload.go`` JSON names, since the
platform publishes no schema).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "schemas"
GiB = 1024 ** 3


@functools.cache
def _definitions(file: str) -> dict[str, Any]:
    definitions: dict[str, Any] = json.loads((SCHEMAS / file).read_text())["definitions"]
    for definition in definitions.values():
        # Swagger leaves objects open; a misspelt field must fail here, not be ignored by the API server later.
        if definition.get("properties") and "additionalProperties" not in definition:
            definition["additionalProperties"] = False
    return definitions


def validate(obj: dict[str, Any], file: str, definition: str) -> None:
    schema = {"definitions": _definitions(file), "$ref": f"#/definitions/{definition}"}
    jsonschema.Draft7Validator(schema).validate(obj)


def quantity_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text)
    assert m, text
    return int(m.group(1)) * 1024 ** ("", "Ki", "Mi", "Gi", "Ti").index(m.group(2) or "")


def check_kubevirt(text: str, virtual_size: int | None = None) -> dict[str, Any]:
    """Schema-valid VirtualMachine (and DataVolumes) that admission would accept; returns the VM."""
    docs = list(yaml.safe_load_all(text))
    vm = docs[-1]
    validate(vm, "kubevirt.swagger.json", "v1.VirtualMachine")
    volumes_made = {t["metadata"]["name"] for t in vm["spec"].get("dataVolumeTemplates", [])}
    for dv in docs[:-1]:
        assert dv["kind"] == "DataVolume"
        validate(dv, "cdi.swagger.json", "v1beta1.DataVolume")
        requested = quantity_bytes(dv["spec"]["storage"]["resources"]["requests"]["storage"])
        assert virtual_size is not None and requested >= virtual_size, "A larger PVC is required"
        volumes_made.add(dv["metadata"]["name"])
    for volume in vm["spec"]["template"]["spec"]["volumes"]:
        if "dataVolume" in volume:
            assert volume["dataVolume"]["name"] in volumes_made
    assert vm["apiVersion"] == "kubevirt.io/v1" and vm["kind"] == "VirtualMachine"
    assert vm["spec"]["runStrategy"] in ("Always", "Halted", "Manual", "RerunOnFailure", "Once")
    domain = vm["spec"]["template"]["spec"]["domain"]
    efi = domain.get("firmware", {}).get("bootloader", {}).get("efi")
    if efi is not None and efi.get("secureBoot", True):  # true when left out
        assert domain.get("features", {}).get("smm", {}).get("enabled") is True, "secure boot needs SMM"
    volumes = {v["name"]: v for v in vm["spec"]["template"]["spec"]["volumes"]}
    for disk in domain["devices"]["disks"]:
        if "containerDisk" in volumes[disk["name"]]:
            assert "lun" not in disk, "a containerDisk cannot be a lun"
    for template in vm["spec"].get("dataVolumeTemplates", []):
        dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", **template}
        validate(dv, "cdi.swagger.json", "v1beta1.DataVolume")
        requested = quantity_bytes(template["spec"]["storage"]["resources"]["requests"]["storage"])
        assert virtual_size is not None and requested >= virtual_size, "A larger PVC is required"
    return vm  # type: ignore[no-any-return]


def data_volume(text: str) -> dict[str, Any]:
    """The DataVolume spec: a document of its own, or the VM's template."""
    docs = list(yaml.safe_load_all(text))
    if len(docs) > 1:
        return docs[0]["spec"]  # type: ignore[no-any-return]
    return docs[0]["spec"]["dataVolumeTemplates"][0]["spec"]  # type: ignore[no-any-return]


#: The workload fields diskport writes, as the provider's client/workload.go names them, with their enums.
CPLN_FIELDS: dict[str, Any] = {
    "kind": {"workload"}, "name": str, "description": str,
    "spec": {
        "type": {"vm"},
        "containers": [{"name": str, "cpu": str, "memory": str}],
        "vm": {
            "bootDisk": {"source": {"oci": {"image": str}, "http": {"url": str, "checksum": str}},
                         "persist": {"volumeSet": str}, "bus": {"virtio", "sata", "scsi"}, "bootOrder": int},
            "firmware": {"bootloader": {"bios", "efi"}, "secureBoot": bool},
            "guestOS": {"linux", "windows"},
            "cpu": {"sockets": int, "threads": int},
        },
    },
}


def _check_fields(value: Any, spec: Any, where: str) -> None:
    if isinstance(spec, dict):
        assert isinstance(value, dict), where
        for key, inner in value.items():
            assert key in spec, f"{where}.{key} is not a documented workload field"
            _check_fields(inner, spec[key], f"{where}.{key}")
    elif isinstance(spec, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            _check_fields(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, set):
        assert value in spec, f"{where}: {value!r} not one of {sorted(map(str, spec))}"
    else:
        assert isinstance(value, spec), f"{where}: {value!r} is not {spec.__name__}"


def check_cpln(text: str) -> dict[str, Any]:
    workload = yaml.safe_load(text)
    _check_fields(workload, CPLN_FIELDS, "workload")
    vm = workload["spec"]["vm"]
    source = vm["bootDisk"]["source"]
    assert len(source) == 1, "exactly one of oci or http"
    assert "bootloader" in vm["firmware"], "bootloader always explicit (the default is efi)"
    if "http" in source:
        assert vm["bootDisk"]["persist"]["volumeSet"].startswith("cpln://volumeset/")
        checksum = source["http"].get("checksum")
        assert checksum is None or re.fullmatch(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", checksum)
    else:
        assert re.fullmatch(r"\S+@sha256:[0-9a-f]{64}", source["oci"]["image"]), "pinned by digest"
    if vm["firmware"].get("secureBoot"):
        assert vm["firmware"]["bootloader"] == "efi"
    assert len(workload["spec"]["containers"]) == 1 and "image" not in workload["spec"]["containers"][0]
    return workload  # type: ignore[no-any-return]


def comments_before(text: str, key: str) -> list[str]:
    """The comment lines right above the first line that sets ``key``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"^\s*(- )?{re.escape(key)}:", line):
            found = []
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#"):
                found.insert(0, lines[j].strip())
                j -= 1
            return found
    raise AssertionError(f"no {key} in the YAML")
