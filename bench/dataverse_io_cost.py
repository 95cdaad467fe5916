"""CPU cost per operation of a Dataverse ``$batch`` on our side: building a 1000-operation
request, and reading its answer.

The operations are the writer's (half conditional updates of known subscription rows, half
creates, each asking for its row back). The answer is rendered from the request the client
built with the Dynamics simulator's own pieces (its parsing of the request, its shaping of a
returned row with or without ``$select``, its part and multipart framing), as the simulator
would answer it: so a client that asks for less gets a smaller answer, as from the real API.
Reading the answer is what the client does after the response came in: decoding the parts,
matching them to the operations, and reading the stamps of its writes; the writer then reads
each result's status and returned row.

One run measures the code importable from here (``PYTHONPATH`` picks it). ``--compare DIR``
runs this file ``--runs`` times for the code in DIR and for this checkout, interleaved, and
prints the medians (µs of CPU per operation) and their ratios::

    .venv/bin/python bench/dataverse_io_cost.py --compare /work/main
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

OPERATIONS = 1000
ROOT = "/api/data/v9.2"
SERVICE_ROOT = f"https://org.example.com{ROOT}"


def _operations() -> list[tuple[str, Any]]:
    """The writer's operations (see services/writer/dynamics.py), numbered."""
    from common.vendors.dataverse import schema
    from common.vendors.dataverse.batch import BatchOperation

    # a build that asks for selected columns only does so (older ones had no ``select``)
    answer: dict[str, Any] = {}
    if "select" in BatchOperation.__dataclass_fields__:
        answer["select"] = schema.WRITTEN_COLUMNS
    out: list[tuple[str, Any]] = []
    for n in range(1, OPERATIONS + 1):
        if n % 2:
            op = BatchOperation.update(
                schema.SUBSCRIPTIONS, f"00000000-0000-0000-0001-{n:012d}",
                {"psync_status": schema.OPTED_IN}, if_match=f'W/"{1000 + n}"',
                return_representation=True, content_id=str(n), **answer)
        else:
            op = BatchOperation.create(schema.SUBSCRIPTIONS, {
                "psync_status": schema.OPTED_OUT,
                "psync_preferenceid@odata.bind": "/psync_marketingpreferences("
                                                 "00000000-0000-0000-0002-000000000001)",
                "psync_contactid@odata.bind": f"/contacts(00000000-0000-0000-0003-{n:012d})",
            }, return_representation=True, content_id=str(n), **answer)
        out.append((str(n), op))
    return out


def _build(chunk: Sequence[tuple[str, Any]]) -> tuple[bytes, str]:
    """What the client does to build one ``$batch`` request (both builds' entry points)."""
    from common.vendors.dataverse import batch

    boundary = batch.new_boundary("batch")
    if _draws_per_batch():
        payload = batch.encode_batch(chunk, service_root=ROOT, change_set=False,
                                     batch_boundary=boundary,
                                     change_set_boundary=batch.new_boundary("changeset"))
    else:
        payload = batch.encode_batch(chunk, service_root=ROOT, change_set=False,
                                     batch_boundary=boundary)
    return payload, f'multipart/mixed; boundary="{boundary}"'


@functools.cache
def _draws_per_batch() -> bool:
    # the older client drew a change set boundary per batch as well (unused without one)
    import inspect

    from common.vendors.dataverse import client
    return 'new_boundary("changeset")' in inspect.getsource(client.DataverseClient._batch_once)


def _answer(payload: bytes, content_type: str) -> tuple[bytes, str]:
    """The simulator's answer to ``payload``: each write applied, its row returned."""
    from datetime import UTC, datetime
    from urllib.parse import parse_qsl, urlsplit

    from services.simulators.dynamics import batch as sim
    from services.simulators.dynamics.odata import parse_select
    from services.simulators.dynamics.protocol import json_result
    from services.simulators.dynamics.reads import context_fragment, shape
    from services.simulators.dynamics.schema import TABLES

    table = TABLES["psync_marketingpreferencesubscriptions"]
    stamp = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    rendered: list[bytes] = []
    for n, part in enumerate(sim.parse_parts(payload, content_type), start=1):
        assert part.changeset is not None
        [request] = part.changeset
        query = dict(parse_qsl(urlsplit(request.url).query))
        select = parse_select(query["$select"], table) if "$select" in query else None
        row: dict[str, Any] = dict.fromkeys(table.columns)
        row.update({table.pk: f"00000000-0000-0000-0001-{n:012d}", "psync_status": 100000000,
                    "psync_name": f"subscription {n}", "statecode": 0, "statuscode": 1,
                    "versionnumber": 5000 + n, "modifiedon": stamp, "createdon": stamp,
                    "_psync_preferenceid_value": "00000000-0000-0000-0002-000000000001",
                    "_psync_contactid_value": f"00000000-0000-0000-0003-{n:012d}"})
        body = {"@odata.context": f"{SERVICE_ROOT}/$metadata#"
                                  f"{context_fragment(table.entity_set, select)}/$entity",
                **shape(row, table, select)}
        result = json_result(body, status=201 if request.method == "POST" else 200, headers={
            "ETag": f'W/"{row["versionnumber"]}"', "Preference-Applied": "return=representation"})
        inner = f"changesetresponse_{n:08d}"
        rendered.append(f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n".encode()
                        + sim._multipart([sim._http_part(result, content_id=request.content_id)],
                                         inner).rstrip(b"\r\n"))
    boundary = "batchresponse_00000000-0000-0000-0000-000000000001"
    return sim._multipart(rendered, boundary), f"multipart/mixed; boundary={boundary}"


def _reader() -> Callable[[Sequence[tuple[str, Any]], bytes, str], list[Any]]:
    """What the client does with a ``$batch`` answer: the parts, one result per operation,
    the stamps of its writes (see DataverseClient._batch_once)."""
    from common.config import DynamicsConfig, Secret
    from common.vendors.dataverse import client as dataverse_client
    from common.vendors.dataverse.batch import decode_batch
    from common.vendors.dataverse.client import DataverseClient, parse_stamp

    # the client only reads answers here (it never signs in): a throw-away secret, as the
    # bench's worlds make theirs
    client = DataverseClient(config=DynamicsConfig(
        url="https://org.example.com", token_url="https://login.example.com/t/oauth2/v2.0/token",
        client_id="bench", client_secret=Secret(secrets.token_urlsafe(12)),
        scope="https://org.example.com/.default"))

    def stamps(chunk: Sequence[tuple[str, Any]], results: Sequence[Any]) -> object:
        # (older builds read every stamp inline in DataverseClient._batch_once)
        written = [parse_stamp(r.body.get("modifiedon")) for r in results
                   if r.ok and r.body is not None]
        return max((s for s in written if s is not None), default=None)

    newest = getattr(dataverse_client, "newest_write_stamp", stamps)

    def read(chunk: Sequence[tuple[str, Any]], body: bytes, content_type: str) -> list[Any]:
        parts = decode_batch(body, content_type)
        results = client._match_parts(chunk, parts, change_set=False, stopped=False)
        assert newest(chunk, results) is not None
        # what the writer reads of each result: its status and the row returned
        assert all(r.ok and r.body for r in results)
        return results

    return read


def _check(results: Sequence[Any]) -> None:
    """Each result names its record and carries its etag (read once, outside the timing: the
    writer does not ask for them)."""
    assert all(r.entity_id and r.etag for r in results)


def _cpu_us_per_op(step: Callable[[], Any], *, repeat: int) -> float:
    step()  # warm
    began = time.process_time()
    for _ in range(repeat):
        step()
    return (time.process_time() - began) / repeat / OPERATIONS * 1e6


def measure(repeat: int) -> dict[str, float]:
    chunk = _operations()
    payload, content_type = _build(chunk)
    answer, answer_type = _answer(payload, content_type)
    read = _reader()
    _check(read(chunk, answer, answer_type))
    return {
        "build_us": _cpu_us_per_op(lambda: _build(chunk), repeat=repeat),
        "read_us": _cpu_us_per_op(lambda: read(chunk, answer, answer_type), repeat=repeat),
        "request_bytes": len(payload) / OPERATIONS,
        "answer_bytes": len(answer) / OPERATIONS,
    }


def compare(other: Path, *, runs: int, repeat: int) -> None:
    here = Path(__file__).resolve().parent.parent
    found: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(runs):  # interleaved, so both see the same machine load
        for label, code in (("before", other), ("after", here)):
            env = {**os.environ, "PYTHONPATH": str(code)}
            out = subprocess.run([sys.executable, __file__, "--repeat", str(repeat)], env=env,
                                 check=True, capture_output=True, text=True, cwd=code).stdout
            found[label].append(json.loads(out))
    print(f"{OPERATIONS}-operation $batch, CPU per operation, median of {runs} runs "
          f"(before: {other}, after: {here})")
    for key, unit in (("build_us", "µs"), ("read_us", "µs"), ("request_bytes", "B"),
                      ("answer_bytes", "B")):
        before = statistics.median(r[key] for r in found["before"])
        after = statistics.median(r[key] for r in found["after"])
        print(f"  {key:<14} before {before:8.2f} {unit}  after {after:8.2f} {unit}  "
              f"ratio {before / after:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, help="the other checkout (the 'before' code)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20, help="batches per measurement")
    args = parser.parse_args()
    if args.compare is not None:
        compare(args.compare, runs=args.runs, repeat=args.repeat)
    else:
        print(json.dumps(measure(args.repeat)))


if __name__ == "__main__":
    main()
