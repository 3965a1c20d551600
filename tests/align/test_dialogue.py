"""Dialogue formats, `starkret align`, the HTML report and retrieval evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import starkret
from starkret.align.dialogue import align_file
from starkret.align.eval import evaluate, retrieval_metrics
from starkret.align.formats import (
    FormatError,
    SharingMoment,
    find_sharing_moments,
    parse_ultron_output,
    read_episodes,
)
from starkret.align.report import write_report
from starkret.testing import write_source

# ==== Parsers ====


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<RET> <h> my dog Star on the sofa </h>", "my dog Star on the sofa"),
        ("Sure!<RET><h>a red bike</h></s>", "a red bike"),
        ("< RET >  < h >  spaced   out  < / h >", "spaced out"),
        ("<RET> <h> no closing tag<|endoftext|>", "no closing tag"),
        ("<ret> <H> Case </H>", "Case"),
        ("<RET> a description without h tags </s>", "a description without h tags"),
        ("<RET> <h> </h>", None),
        ("no retrieval token here <h> x </h>", None),
        ("", None),
    ],
)
def test_parse_ultron_output(text, expected):
    assert parse_ultron_output(text) == expected


def test_parse_ultron_output_rejects_non_text():
    with pytest.raises(TypeError):
        parse_ultron_output(None)


def test_find_sharing_moments():
    text = (
        "A: I went hiking yesterday.\n"
        "B: Nice! Any pictures?\n"
        "A: [Sharing Image] <a mountain trail covered in autumn leaves>\n"
        "[sharing image] a selfie at the summit\n"
        "B: [Sharing Image]\n"
    )
    assert find_sharing_moments(text) == [
        SharingMoment(3, "A", "a mountain trail covered in autumn leaves"),
        SharingMoment(4, None, "a selfie at the summit"),
    ]


def test_read_episodes_nested_flat_and_json_list(tmp_path):
    nested = {
        "episode_id": "e1",
        "sessions": [
            {
                "session": 1,
                "dialogue": [
                    {"speaker": "A", "utterance": "hi"},
                    {
                        "speaker": "B",
                        "utterance": "look",
                        "sharing_info": {"image_description": "a cat"},
                    },
                ],
            }
        ],
    }
    flat = {
        "unique_id": "e2",
        "session1:dialogue": ["hey", "here"],
        "session1:speakers": ["A", "B"],
        "session1:image_descriptions": ["", "a dog"],
        "session2:dialogue": ["again"],
        "session2:image_descriptions": ["a bird"],
    }
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps(nested) + "\n\n" + json.dumps(flat) + "\n")
    first, second = read_episodes(path)
    assert first.moments() == [
        {"episode_id": "e1", "session": 1, "moment_id": "e1:s1:t1", "description": "a cat"}
    ]
    assert [m["description"] for m in second.moments()] == ["a dog", "a bird"]
    assert [m["session"] for m in second.moments()] == [1, 2]
    as_list = tmp_path / "episodes.json"
    as_list.write_text(json.dumps([nested, flat]))
    assert [e.episode_id for e in read_episodes(as_list)] == ["e1", "e2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"episode_id": "e1", "sessions": [}\n', r"episodes.jsonl:2: invalid JSON"),
        ('{"episode_id": "e1"}\n', "neither 'sessions'"),
        ('{"episode_id": "e1", "sessions": [{"session": 1}]}\n', r"episode e1\): session 1"),
        (
            '{"unique_id": "e9", "session1:dialogue": ["a"], "session1:speakers": ["A", "B"]}\n',
            r"episode e9\): session1:speakers must be a list of 1",
        ),
        ("[1, 2]\n", r"episode #0: expected a JSON object"),
        ('{"sessions": []}\n', "no episode_id"),
    ],
)
def test_malformed_episodes_name_the_line_and_episode(tmp_path, content, message):
    path = tmp_path / "episodes.jsonl"
    path.write_text(
        '{"episode_id": "ok", "sessions": []}\n' + content if content[0] == "{" else content
    )
    with pytest.raises(FormatError, match=message):
        list(read_episodes(path))


# ==== Align on a small DB ====


@pytest.fixture(scope="module")
def tiny():
    return starkret.ClipEmbedder("starkret-tiny", device="cpu")


@pytest.fixture
def small_db(tmp_path, tiny):
    """Images whose vectors are the text embeddings of known descriptions (so the tiny
    model 'retrieves' them), plus distinct distractors."""
    texts = [
        "a golden retriever on a beach",
        "a bar chart of rainfall",
        "a red bicycle",
        "a bowl of ramen",
        "a snowy mountain",
    ]
    planted = tiny.encode_texts(texts, dtype="float32")
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((20, tiny.dim)).astype(np.float32)
    vectors = np.vstack([planted, noise])
    write_source(tmp_path / "db" / "cc12m", "cc12m", vectors[:15])
    write_source(
        tmp_path / "db" / "chartqa",
        "chartqa",
        vectors[15:],
        keys=[f"png/{i}.png" for i in range(10)],
    )
    return starkret.ImageDB.open(tmp_path / "db", embedder=tiny), texts


def _episodes_file(path, texts):
    episode = {
        "episode_id": "e1",
        "sessions": [
            {
                "session": 1,
                "dialogue": [
                    {
                        "speaker": "A",
                        "utterance": "look",
                        "sharing_info": {"image_description": texts[0]},
                    },
                    {
                        "speaker": "B",
                        "utterance": "and mine",
                        "sharing_info": {"image_description": texts[0]},
                    },
                    {"speaker": "A", "utterance": "ok"},
                ],
            }
        ],
    }
    other = {
        "episode_id": "e2",
        "sessions": [
            {
                "session": 1,
                "dialogue": [
                    {
                        "speaker": "A",
                        "utterance": "bike",
                        "sharing_info": {"image_description": texts[2]},
                    },
                ],
            }
        ],
    }
    path.write_text(json.dumps(episode) + "\n" + json.dumps(other) + "\n")
    return path


def test_align_file_writes_stark_fields_without_reuse_and_resumes(tmp_path, small_db):
    db, texts = small_db
    source = _episodes_file(tmp_path / "in.jsonl", texts)
    out = tmp_path / "aligned.jsonl"
    aligner = starkret.Aligner(db, min_score=-1.0, near_duplicate_threshold=0.999)
    report = align_file(db, source, out, aligner=aligner, progress=False, keys="db")
    assert (report.episodes, report.moments, report.chosen) == (2, 3, 3)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    keys = lines[0]["session1:images_key"]
    assert keys[0] == "url:https://img.example/cc12m/000000000.jpg"
    assert keys[1] and keys[1] != keys[0]  # no reuse within the episode
    assert keys[2] == "" and lines[0]["session1:images_module_name"] == ["retrieval"] * 2 + [""]
    assert lines[1]["session1:images_key"] == ["url:https://img.example/cc12m/000000002.jpg"]
    assert lines[0]["alignments"][0]["db_searched_results"]["cc12m"][0]["key"] == keys[0]
    records = [
        json.loads(x) for x in (tmp_path / "aligned.jsonl.images.jsonl").read_text().splitlines()
    ]
    assert {r["image_source"] for r in records} <= {"cc12m", "chartqa"} and len(records) == 3

    # a kill in the middle of writing leaves half a line: it is dropped and redone
    with open(out, "a") as f:
        f.write('{"episode_id": "e3", "broken')
    again = align_file(db, source, out, aligner=aligner, progress=False, keys="db")
    assert (again.skipped_episodes, again.episodes) == (2, 0)
    assert len(out.read_text().splitlines()) == 2


def test_align_plain_moment_jsonl(tmp_path, small_db):
    db, texts = small_db
    path = tmp_path / "moments.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"episode_id": "x", "session": 1, "moment_id": f"m{i}", "description": t})
            for i, t in enumerate(texts[:3])
        )
    )
    report = align_file(
        db,
        path,
        tmp_path / "out.jsonl",
        progress=False,
        aligner=starkret.Aligner(db, min_score=-1.0, near_duplicate_threshold=0.999),
    )
    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert report.moments == 3 and [a["moment_id"] for a in line["alignments"]] == [
        "m0",
        "m1",
        "m2",
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"episode_id": "x", "description": "d"}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:1: moment lacks moment_id"):
        align_file(db, bad, tmp_path / "o2.jsonl", progress=False)


def test_report_is_self_contained_html(tmp_path, small_db):
    db, texts = small_db
    alignments = starkret.Aligner(db, min_score=-1.0).align(
        [{"episode_id": "e", "moment_id": "m", "description": texts[1]}]
    )
    path = write_report(db, alignments, tmp_path / "r.html")
    page = path.read_text()
    assert page.startswith("<!doctype html>") and texts[1] in page
    assert "https://img.example/" in page  # url: sources without local bytes are linked


# ==== Evaluation ====


def test_metrics_on_a_hand_computed_example():
    result = retrieval_metrics([1, 3, 12, 2])
    assert result.recall_at_1 == 25.0 and result.recall_at_5 == 75.0
    assert result.recall_at_10 == 75.0
    assert result.mrr == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 2) / 4 * 100)
    with pytest.raises(ValueError):
        retrieval_metrics([])


def test_evaluate_ranks_the_gallery(small_db):
    db, texts = small_db
    pairs = [{"description": t, "image_key": f"cc12m/{i:09d}"} for i, t in enumerate(texts)]
    pairs.append(
        {
            "ultron_output": f"<RET> <h> {texts[1]} </h>",
            "image_key": "url:https://img.example/cc12m/000000001.jpg",
        }
    )
    pairs.append({"description": texts[0], "image_key": "cc12m/000000003"})
    result = evaluate(db, pairs)
    assert result.ranks[:6] == [1, 1, 1, 1, 1, 1] and result.ranks[6] > 1
    with pytest.raises(ValueError, match="not in the gallery"):
        evaluate(db, [{"description": "x", "image_key": "laion/1"}])
    with pytest.raises(FormatError, match="no <RET>"):
        evaluate(db, [{"ultron_output": "plain", "image_key": "cc12m/000000001"}])
