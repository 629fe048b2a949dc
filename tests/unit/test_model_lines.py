from dataclasses import replace

from paddler.balancer.proxy.routing import ModelLines, model_key
from paddler.slots import SlotTable
from tests.unit.test_slot_table import REPORT as SLOT_TABLE_REPORT

REPORT = replace(SLOT_TABLE_REPORT, model="/models/qwen-0.5b.gguf")


def test_with_no_upstream_a_model_waits_in_its_own_line(table: SlotTable) -> None:
    assert ModelLines(table).key("qwen") == model_key("qwen")


def test_every_name_of_a_served_model_shares_one_line(table: SlotTable) -> None:
    table.apply_report(REPORT, now=1.0)
    lines = ModelLines(table)
    served = model_key("/models/qwen-0.5b.gguf")
    assert [lines.key(name) for name in ("qwen-0.5b", "qwen-0.5b.gguf", REPORT.model)] == [
        served
    ] * 3
    assert lines.key("llama") is None


def test_what_is_remembered_follows_upstreams_joining_changing_and_leaving(
    table: SlotTable,
) -> None:
    table.apply_report(REPORT, now=1.0)
    lines = ModelLines(table)
    assert lines.key("llama") is None
    table.apply_report(
        replace(REPORT, agent_id="a2", name="gpu1", port=8082, model="llama"), now=1.0
    )
    assert lines.key("llama") == model_key("llama")
    # The first upstream is given another model: its old one is served nowhere now.
    table.apply_report(replace(REPORT, model="llama", sequence=2), now=2.0)
    assert lines.key("qwen-0.5b") is None
    table.remove_agent("a1")
    table.remove_agent("a2")
    assert lines.key("qwen-0.5b") == model_key("qwen-0.5b")  # nobody left: it waits


def test_invented_names_do_not_grow_the_memory_without_bound(table: SlotTable) -> None:
    table.apply_report(REPORT, now=1.0)
    lines = ModelLines(table)
    for number in range(3 * ModelLines.BOUND):
        assert lines.key(f"made-up-{number}") is None
    assert len(lines._keys) <= ModelLines.BOUND + 1
