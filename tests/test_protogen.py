"""The committed stubs in seqsal/v1 are exactly what proto/ generates."""

from __future__ import annotations

from seqsal import protogen
from seqsal.v1 import common_pb2, saliency_pb2


def test_generated_stubs_are_up_to_date() -> None:
    assert protogen.stale_files() == [], "run `make proto` and commit the regenerated stubs"


def test_contract_conventions() -> None:
    """Every enum starts with an _UNSPECIFIED = 0 value and every RPC has its own request/response."""
    for module in (common_pb2, saliency_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("UNSPECIFIED"), enum.name
    service = saliency_pb2.DESCRIPTOR.services_by_name["SaliencyService"]
    inputs = [m.input_type.name for m in service.methods]
    assert len(set(inputs)) == len(inputs)
    assert saliency_pb2.DESCRIPTOR.package == "seqsal.v1"
