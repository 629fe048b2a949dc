import pytest

from paddler.llamacpp.formats import UnsupportedFormatError, parse_props, parse_slots


def test_slots_of_current_builds() -> None:
    payload = [
        {"id": 0, "n_ctx": 256, "is_processing": True},
        {"id": 1, "n_ctx": 256, "is_processing": False},
        {"id": 2, "n_ctx": 256, "is_processing": False},
    ]
    counts = parse_slots(payload)
    assert (counts.idle, counts.processing) == (2, 1)


def test_slots_of_older_builds() -> None:
    counts = parse_slots([{"id": 0, "state": 1}, {"id": 1, "state": 0}])
    assert (counts.idle, counts.processing) == (1, 1)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"slots": []}, "did not answer a JSON list"),
        ([{"id": 0}], "neither is_processing"),
        (["x"], "not a slot object"),
    ],
)
def test_unknown_slot_shapes_are_named(payload: object, message: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=message):
        parse_slots(payload)


def test_props_prefers_the_alias_then_the_file_name() -> None:
    props = parse_props(
        {"total_slots": 4, "build_info": "b100", "model_path": "/m/tiny.gguf", "is_sleeping": False}
    )
    assert (props.total_slots, props.build, props.model, props.is_sleeping) == (
        4,
        "b100",
        "tiny.gguf",
        False,
    )
    assert parse_props({"total_slots": 1, "model_alias": "chat", "model_path": "/x"}).model == (
        "chat"
    )
    assert parse_props({"total_slots": 1, "is_sleeping": True}).is_sleeping


def test_props_without_slot_count() -> None:
    with pytest.raises(UnsupportedFormatError, match="total_slots"):
        parse_props({"build_info": "b1"})
