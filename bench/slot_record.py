"""What the slot record (paddler/prefixes/slots.py) costs the balancer per request, in
process, against the prefix index's own work for the same request measured in the same
run.

    python bench/slot_record.py [--requests N]

Each round runs N requests of a conversation after a shared system prompt on one
upstream of 2, 8 and 32 slots, every slot holding a conversation: the slot record's
take() and release(), and, as the baseline, the prefix index's holders(), remember()
and vacate() for the same keys (what cache_aware did per streamed request before slots
were named). Prints microseconds per request and the ratio of the two.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paddler
from paddler.prefixes.index import PrefixIndex
from paddler.prefixes.keys import prefix_keys
from paddler.prefixes.slots import SlotContents

SYSTEM = "You answer questions about the fleet. " * 40


def conversation(number: int) -> list[tuple[int, int]]:
    return prefix_keys(
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"question {number} " * 50},
                {"role": "assistant", "content": "an answer " * 50},
                {"role": "user", "content": "and then?"},
            ]
        }
    )


def slot_record(contents: SlotContents, slots: int, requests: int) -> float:
    conversations = [conversation(number) for number in range(slots)]
    now = 1.0
    for keys in conversations:  # every slot holds one
        slot, _ = contents.take(1, 1, 0, slots, keys, keys[-1][1], now)
        contents.release(1, 1, slot, now + 0.5)
        now += 1.0
    started = time.perf_counter()
    for number in range(requests):
        keys = conversations[number % slots]
        slot, _ = contents.take(1, 1, 0, slots, keys, keys[-1][1], now)
        contents.release(1, 1, slot, now + 0.1)
        now += 0.2
    return (time.perf_counter() - started) / requests


def prefix_index(index: PrefixIndex, slots: int, requests: int) -> float:
    conversations = [conversation(number) for number in range(slots)]
    now = 1.0
    started = time.perf_counter()
    for number in range(requests):
        keys = conversations[number % slots]
        index.holders(keys, 4, now, [])
        held = [key for key, _ in keys]
        index.remember(held, 1, 1, 0, now, True)
        index.vacate(held, 1, 1)
        now += 0.2
    return (time.perf_counter() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    print(f"hot path: {paddler.HOT_PATH}")
    with tempfile.TemporaryDirectory() as directory:
        for slots in (2, 8, 32):
            contents = SlotContents.create(Path(directory) / f"contents-{slots}", rows=4)
            index = PrefixIndex.create(Path(directory) / f"prefixes-{slots}", sets=1024)
            record = slot_record(contents, slots, args.requests)
            baseline = prefix_index(index, slots, args.requests)
            print(
                f"{slots:2} slots: slot record {record * 1e6:5.1f} us per request, "
                f"prefix index {baseline * 1e6:5.1f} us: {record / baseline:.2f}x"
            )
            contents.close()
            index.close()


if __name__ == "__main__":
    main()
