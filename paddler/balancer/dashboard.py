"""The web dashboard on the management port: one page, no external assets (it works
offline), refreshed every second from /dashboard/fleet.json.

Text from agents (names, models, errors) is put in the page with textContent only:
an agent must not be able to run script in an operator's browser.
"""

from typing import Any

from paddler.metrics.exposition import FleetSnapshot
from paddler.metrics.traffic import Totals
from paddler.slots.view import describe


def fleet_json(fleet: FleetSnapshot, totals: Totals, missed_reports: int) -> dict[str, Any]:
    upstreams = sorted(
        (describe(row, fleet.now, missed_reports) for row in fleet.rows),
        key=lambda upstream: str(upstream["name"]),
    )
    return {
        "upstreams": upstreams,
        "queued": fleet.queued,
        "oldest_wait": round(fleet.oldest_wait, 3),
        "demand": fleet.demand.as_json(),
        "totals": {
            "at": totals.at,
            "requests": totals.requests,
            "errors": totals.errors,
            # JSON has no infinity: the last bucket's bound is sent as null.
            "buckets": [
                [None if bound == float("inf") else bound, count]
                for bound, count in sorted(totals.buckets.items())
            ],
        },
    }


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Paddler</title>
<style>
  :root { color-scheme: light dark; --ok: #2e8b57; --busy: #d08a00; --full: #c0392b;
          --muted: #888; --line: #8884; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; }
  h1 { font-size: 1.3rem; margin: 0 0 1rem; }
  h1 small { color: var(--muted); font-weight: normal; font-size: .8rem; margin-left: .5rem; }
  .cards { display: flex; flex-wrap: wrap; gap: .75rem; margin-bottom: 1.25rem; }
  .card { border: 1px solid var(--line); border-radius: 6px; padding: .5rem .8rem;
          min-width: 8.5rem; }
  .card b { display: block; font-size: 1.4rem; }
  .card span { color: var(--muted); font-size: .8rem; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line);
           white-space: nowrap; }
  th { color: var(--muted); font-weight: 600; font-size: .8rem; }
  .bar { display: inline-block; width: 8rem; height: .7rem; background: var(--line);
         border-radius: 3px; vertical-align: middle; margin-right: .4rem; overflow: hidden; }
  .bar i { display: block; height: 100%; background: var(--ok); }
  .state-ready { color: var(--ok); }
  .state-draining, .state-stale, .state-ejected, .state-loading { color: var(--busy); }
  .state-error, .state-unreachable, .state-unauthorized { color: var(--full); }
  #problem { color: var(--full); }
</style>
</head>
<body>
<h1>Paddler <small id="updated">connecting…</small></h1>
<div class="cards">
  <div class="card"><b id="slots">&ndash;</b><span>slots busy</span></div>
  <div class="card"><b id="queued">&ndash;</b><span>requests queued</span></div>
  <div class="card"><b id="oldest">&ndash;</b><span>oldest wait</span></div>
  <div class="card"><b id="rate">&ndash;</b><span>requests / s</span></div>
  <div class="card"><b id="errors">&ndash;</b><span>5xx / s</span></div>
  <div class="card"><b id="p50">&ndash;</b><span>latency p50</span></div>
  <div class="card"><b id="p99">&ndash;</b><span>latency p99</span></div>
  <div class="card"><b id="desired">&ndash;</b><span>upstreams wanted</span></div>
</div>
<table>
  <thead><tr><th>upstream</th><th>address</th><th>model</th><th>state</th>
  <th>slots busy</th><th>in flight</th><th>last report</th><th>llama.cpp</th>
  <th>error</th></tr></thead>
  <tbody id="upstreams"></tbody>
</table>
<p id="problem"></p>
<script>
"use strict";
const WINDOW = 60;  // seconds of readings that rates and latencies are taken over
const readings = [];

function text(id, value) { document.getElementById(id).textContent = value; }

function cell(row, value, className) {
  const td = document.createElement("td");
  if (value instanceof Node) td.appendChild(value); else td.textContent = value;
  if (className) td.className = className;
  row.appendChild(td);
}

function bar(busy, total) {
  const span = document.createElement("span");
  const outer = document.createElement("span");
  outer.className = "bar";
  const fill = document.createElement("i");
  const share = total ? busy / total : 0;
  fill.style.width = Math.round(100 * share) + "%";
  fill.style.background = share >= 1 ? "var(--full)" : share > 0 ? "var(--busy)" : "var(--ok)";
  outer.appendChild(fill);
  span.appendChild(outer);
  span.appendChild(document.createTextNode(busy + "/" + total));
  return span;
}

// Prometheus's histogram_quantile over cumulative [bound, count] pairs (null: +Inf).
function quantile(q, buckets) {
  if (!buckets.length || buckets[buckets.length - 1][1] <= 0) return null;
  const rank = q * buckets[buckets.length - 1][1];
  let lowerBound = 0, lowerCount = 0;
  for (const [bound, count] of buckets) {
    if (count >= rank) {
      if (bound === null) return lowerBound;
      const share = count > lowerCount ? (rank - lowerCount) / (count - lowerCount) : 1;
      return lowerBound + (bound - lowerBound) * share;
    }
    lowerBound = bound; lowerCount = count;
  }
  return lowerBound;
}

function ms(seconds) { return seconds === null ? "\\u2013" : Math.round(seconds * 1000) + " ms"; }

function traffic(latest) {
  while (readings.length && latest.at - readings[0].at > WINDOW) readings.shift();
  if (readings.length && latest.requests < readings[readings.length - 1].requests) {
    readings.length = 0;  // the balancer restarted: its counts began again
  }
  readings.push(latest);
  const first = readings[0];
  const seconds = latest.at - first.at;
  if (seconds <= 0) return;
  text("rate", ((latest.requests - first.requests) / seconds).toFixed(1));
  text("errors", ((latest.errors - first.errors) / seconds).toFixed(1));
  const before = new Map(first.buckets.map(([bound, count]) => [bound, count]));
  const window = latest.buckets.map(([bound, count]) => [bound, count - (before.get(bound) || 0)]);
  text("p50", ms(quantile(0.5, window)));
  text("p99", ms(quantile(0.99, window)));
}

function show(fleet) {
  let busy = 0, total = 0;
  const body = document.getElementById("upstreams");
  body.replaceChildren();
  for (const upstream of fleet.upstreams) {
    const slots = upstream.slots;
    if (upstream.in_rotation) { total += slots.total; busy += slots.total - slots.free; }
    const row = document.createElement("tr");
    cell(row, upstream.name);
    cell(row, upstream.address);
    cell(row, upstream.model);
    cell(row, upstream.state, "state-" + upstream.state);
    cell(row, bar(slots.total - slots.free, slots.total));
    cell(row, String(upstream.reservations));
    cell(row, upstream.last_report_age.toFixed(1) + " s ago");
    cell(row, upstream.build);
    cell(row, upstream.error);
    body.appendChild(row);
  }
  text("slots", busy + "/" + total);
  text("queued", String(fleet.queued));
  text("oldest", fleet.queued ? fleet.oldest_wait.toFixed(1) + " s" : "\\u2013");
  text("desired", String(fleet.demand.desired_upstreams));
  traffic(fleet.totals);
  text("updated", fleet.upstreams.length + " upstreams · " + new Date().toLocaleTimeString());
  text("problem", "");
}

async function refresh() {
  try {
    const answer = await fetch("dashboard/fleet.json", {cache: "no-store"});
    if (!answer.ok) throw new Error("the balancer answered " + answer.status);
    show(await answer.json());
  } catch (error) {
    text("problem", "Cannot read the fleet: " + error.message);
  }
}

refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
