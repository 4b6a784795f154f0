"""core/format/json_lines.py: the values of a JSON-lines file, read a piece at a time."""

import json
import os

import pytest

from candle_ckpt.core.format import json_lines
from candle_ckpt.core.format.json_lines import json_line, parse_lines, read_chunks

LINES = [
    json_line([1, "a", 0.5]),
    b"\n",  # blank
    json_line({"epoch": 2, "metrics": {"loss": 0.25}}),
    b'[3, "damaged"\n',
    json_line(["a line much longer than the pieces " * 8]),
    b"   \n",  # blank
    b"not json\n",
    json_line([6]),
    b'[7, "torn by a kill',
]


def expected(data):
    """Line by line, as parse_lines promises: (values, numbers of the damaged lines)."""
    values, damaged = [], []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except ValueError:
                damaged.append(number)
    return values, damaged


@pytest.mark.parametrize("piece_bytes", [1, 7, 40, 100, 16384])
def test_pieces_of_any_size_read_every_line_and_number_the_damaged(monkeypatch, piece_bytes):
    monkeypatch.setattr(json_lines, "_PIECE_BYTES", piece_bytes)
    for count in range(len(LINES) + 1):
        data = b"".join(LINES[:count])
        damaged: list[int] = []
        values = parse_lines([data], lambda number, error, found=damaged: found.append(number))
        assert (values, damaged) == expected(data), (piece_bytes, count)


@pytest.mark.parametrize("chunk_bytes", [1, 3, 17, 1000])
def test_lines_across_chunks(monkeypatch, chunk_bytes):
    monkeypatch.setattr(json_lines, "_PIECE_BYTES", 40)
    data = b"".join(LINES)
    chunks = [data[at : at + chunk_bytes] for at in range(0, len(data), chunk_bytes)]
    damaged: list[int] = []
    values = parse_lines(chunks, lambda number, error: damaged.append(number))
    assert (values, damaged) == expected(data)


def test_read_chunks_reads_to_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(json_lines, "_PIECE_BYTES", 5)
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"".join(LINES))
    descriptor = os.open(path, os.O_RDONLY)
    try:
        assert b"".join(read_chunks(descriptor)) == b"".join(LINES)
    finally:
        os.close(descriptor)


def test_a_file_of_well_formed_lines_is_parsed_by_pieces(monkeypatch):
    monkeypatch.setattr(json_lines, "_PIECE_BYTES", 64)
    data = b"".join(json_line([epoch, "x" * (epoch % 50)]) for epoch in range(1000))
    assert parse_lines([data]) == [[epoch, "x" * (epoch % 50)] for epoch in range(1000)]
    assert parse_lines([b""]) == [] and parse_lines([b"[1]"]) == []
