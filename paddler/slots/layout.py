"""The slot table's binary layout.

One file in a tmpfs (``/run/paddler``), mapped by every balancer process. All
integers little-endian. Version 8:

Header page (4096 bytes)
    offset 0   8s   magic b"PDLRSLOT"
    offset 8   u32  layout version
    offset 12  u32  max_upstreams (rows)
    offset 16  u32  max_owners (processes that may hold reservations)
    offset 20  u32  row size in bytes
    offset 24  f64  creation time (Unix seconds)
    offset 32  u32  pid of the creating balancer
    offset 36  u32  max_waiters (entries of the waiting queue)
    offset 40  u64  next ticket of the waiting queue
    offset 48  u32  entries in use in the waiting queue (0: nobody waits, skip the scan)
    offset 52  u32  rows ever used: every row from there on is free (scans stop there)
    offset 56  u32  structure version: bumped when a row gets another state, model or
                    generation, or is freed (what a process may remember between requests)
    offset 64  owners: max_owners x 16 bytes, each
               u32 pid, u32 padding, u64 process start time (clock ticks since boot,
               from /proc/PID/stat); pid 0 marks a free entry. The start time tells
               a live owner from an unrelated process that reuses its pid.

Rows, from offset 4096, max_upstreams x row size, each
    offset 0    u32  seqlock: odd while a writer rewrites the row's report fields;
                     lock-free readers (paddlerctl) retry until it is even and unchanged
    offset 4    u8   state (UpstreamState; 0 = free row)
    offset 8    u32  generation: bumped whenever the row is given to another upstream,
                     so that a late release of a reservation on the old one is ignored
    offset 12   u16  port
    offset 14   u16  slots total, 16 idle, 18 processing (as the agent last reported)
    offset 20   u16  reservations of this balancer when that report was applied
    offset 24   f64  last report (CLOCK_MONOTONIC seconds, comparable across processes)
    offset 32   f64  the agent's report interval in seconds
    offset 40   u64  sequence number of the last accepted report
    offset 48   f64  first report (CLOCK_MONOTONIC)
    offset 56   u32  tokens of idle slots' prompts its host-memory prompt cache keeps, as
                     the agent reported them (0: none, or unknown)
    offset 60   32s  agent id          92   64s name       156  128s host
    offset 284  128s model             412  64s llama.cpp build
    offset 476  156s error
    (offsets 4 to 632 are the report fields, rewritten whole by every report)
    offset 632  f64  ejected until (CLOCK_MONOTONIC; 0: not ejected)
    offset 640  u32  ejections in a row (the next ejection lasts longer)
    offset 644  i16  free slots: total - foreign busy - reservations, kept current by
                     every writer so that choosing reads one number per row
    offset 646  u16  reservations: the sum of the per-owner counters below
    offset 648  u8   drained: 1 while an operator drains the upstream (paddlerctl drain):
                     no new requests; reports leave it as it is
    offset 650  u16  this balancer's reservations released since the last report was
                     applied: that report may have been measured before they ended
    offset 652  u32  cache epoch: moves whenever the upstream may have lost its KV cache
                     (it reported a state other than ready, or the balancer found its
                     cache guesses missing); prefixes remembered in another epoch are void
    offset 656  f64  last chosen (CLOCK_MONOTONIC): when a request last took a slot here;
                     policies that spread break ties for the least busy by it, oldest first
    offset 664  reservations: max_owners x u16, one counter per owner process

The waiting queue, after the rows, max_waiters x 32 bytes, each
    offset 0   u64  ticket (0: a free entry); lower tickets were queued earlier
    offset 8   u16  owner (index in the owners table)
    offset 12  u32  model key (0: any model; else crc32 of the model asked for)
    offset 16  f64  queued at (CLOCK_MONOTONIC)

Writers hold an flock on the file; every process opens its own descriptor after
fork (an inherited descriptor would share the lock). The kernel drops the lock of
a process that dies, so a SIGKILL inside the critical section blocks no one; what
it leaves half-written is repaired: report fields by the next report (the seqlock
shows readers the tear meanwhile), reservations by reclaiming dead owners' counters.
"""

import enum
import struct
from typing import Final

MAGIC: Final = b"PDLRSLOT"
LAYOUT_VERSION: Final = 8
HEADER_SIZE: Final = 4096
HEADER: Final = struct.Struct("<8sIIIIdIIQII")
NEXT_TICKET_OFFSET: Final = 40
WAITING_OFFSET: Final = 48
ROWS_USED_OFFSET: Final = 52
STRUCTURE_OFFSET: Final = 56
OWNERS_OFFSET: Final = 64
OWNER: Final = struct.Struct("<IIQ")
ROW_META: Final = struct.Struct("<IBxxxIHHHHHxxddQdI32s64s128s128s64s156s")
# The same row in two parts: numbers read on every request, texts once per report.
ROW_NUMBERS: Final = struct.Struct("<IBxxxIHHHHHxxddQdI")
ROW_TEXTS: Final = struct.Struct("<32s64s128s128s64s156s")
EJECTION: Final = struct.Struct("<dI4x")  # read whole; written without the counters after it
EJECTION_FIELDS: Final = struct.Struct("<dI")
EJECTION_OFFSET: Final = 632
FREE_OFFSET: Final = 644
HOST_CACHE_OFFSET: Final = 56
PROCESSING_OFFSET: Final = 18  # slots processing, as the agent last reported
RESERVED_AT_REPORT_OFFSET: Final = 20
UNLIMITED_HOST_CACHE: Final = 0xFFFFFFFF  # the most host cache tokens a report may say
RESERVED_OFFSET: Final = 646
DRAINED_OFFSET: Final = 648
RELEASED_OFFSET: Final = 650
CACHE_EPOCH_OFFSET: Final = 652
CHOSEN_OFFSET: Final = 656
RESERVATIONS_OFFSET: Final = 664
WAITER: Final = struct.Struct("<QHxxId8x")
DEFAULT_MAX_WAITERS: Final = 1024
DEFAULT_MAX_OWNERS: Final = 64
DEFAULT_MAX_UPSTREAMS: Final = 256

assert ROW_META.size == EJECTION_OFFSET == ROW_NUMBERS.size + ROW_TEXTS.size
assert EJECTION_OFFSET + EJECTION.size == DRAINED_OFFSET
assert CHOSEN_OFFSET % 8 == 0
assert ROW_NUMBERS.size == HOST_CACHE_OFFSET + 4
assert CHOSEN_OFFSET + 8 == RESERVATIONS_OFFSET
assert WAITER.size == 32
# The owners table fills the rest of the header page.
MAX_OWNERS: Final = (HEADER_SIZE - OWNERS_OFFSET) // OWNER.size


def row_size(max_owners: int) -> int:
    """Rows are padded to 64 bytes so that no two share a cache line."""
    return -(-(RESERVATIONS_OFFSET + 2 * max_owners) // 64) * 64


class UpstreamState(enum.IntEnum):
    FREE = 0
    READY = 1  # answering, slots known
    ASLEEP = 2  # llama-server sleeps (--sleep-idle-seconds): capacity behind a wake-up
    LOADING = 3  # loading its model (/health answers 503)
    UNREACHABLE = 4  # the agent cannot reach it
    UNAUTHORIZED = 5  # it wants an API key the agent does not have (401)
    SLOTS_DISABLED = 6  # started with --no-slots (/slots answers 501)
    ERROR = 7  # anything else the agent could not make sense of
    REMOVED = 8  # its agent stopped cleanly; kept only while reservations drain
