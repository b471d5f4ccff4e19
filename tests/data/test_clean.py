"""`slm data clean`: MinHash-LSH against exact Jaccard on planted near duplicates, exact dedup, each quality rule,
determinism under reordering and resharding, the output `slm data prepare` reads, and bad input."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from itertools import combinations
from pathlib import Path

import pytest

from slmkit_testing import SRC, run_slm

pytest.importorskip("datasketch")

from slmkit.cli import run
from slmkit.data.clean import (  # noqa: E402
    QUALITY_RULES,
    NearDuplicateIndex,
    QualityThresholds,
    clean,
    jaccard,
    quality_signals,
    quality_verdict,
    shingles,
)
from slmkit.errors import UserError  # noqa: E402

# English-like words of 4-8 letters, many of them, so that random documents share almost no word 5-grams
_RNG = random.Random(1234)
VOCAB = sorted({"".join(_RNG.choice("abcdefghijklmnoprstuvw") for _ in range(_RNG.randint(4, 8))) for _ in range(3000)})


def prose(rng: random.Random, words: int = 120, per_line: int = 12) -> str:
    """A document that passes every default quality rule: varied words in lines of `per_line`, sentences."""
    tokens = [rng.choice(VOCAB) for _ in range(words)]
    lines = [" ".join(tokens[i : i + per_line]) + "." for i in range(0, words, per_line)]
    return "\n".join(lines)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def kept_records(out: Path) -> set[tuple[str, str]]:
    found = set()
    for path in out.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            found.add((record["source"], record["text"]))
    return found


# ---- MinHash LSH against exact Jaccard --------------------------------------------------------------------


def planted_groups(rng: random.Random, groups: int = 40, length: int = 200) -> list[list[str]]:
    """Each group: a base document and variants with 1..40 of its words replaced, so that the exact Jaccard of
    pairs in a group spreads from ~0.97 down to ~0.2 across the 0.8 threshold; groups share no shingles."""
    out = []
    for _ in range(groups):
        base = [rng.choice(VOCAB) for _ in range(length)]
        group = [" ".join(base)]
        for changes in (1, 2, 3, 4, 6, 8, 12, 20, 40):
            variant = list(base)
            for position in rng.sample(range(length), changes):
                variant[position] = rng.choice(VOCAB)
            group.append(" ".join(variant))
        out.append(group)
    return out


def test_minhash_lsh_precision_and_recall_against_exact_jaccard():
    threshold = 0.8
    groups = planted_groups(random.Random(0))
    docs = [text for group in groups for text in group]
    sets = [shingles(text) for text in docs]
    index = NearDuplicateIndex(threshold)
    signatures = [index.signature(text) for text in docs]
    for i, signature in enumerate(signatures):
        index.add(i, signature)
    predicted = {(min(i, j), max(i, j)) for i in range(len(docs)) for j, _ in index.query(signatures[i]) if j != i}
    truth = {(i, j) for i, j in combinations(range(len(docs)), 2) if jaccard(sets[i], sets[j]) >= threshold}
    similarities = [jaccard(sets[i], sets[j]) for group_start in range(0, len(docs), 10) for i, j in
                    combinations(range(group_start, group_start + 10), 2)]  # fmt: skip
    # the planted set really straddles the threshold
    assert sum(s >= threshold for s in similarities) >= 200 and sum(s < threshold for s in similarities) >= 1000
    assert sum(0.7 <= s < 0.9 for s in similarities) >= 100
    hits = len(predicted & truth)
    precision, recall = hits / len(predicted), hits / len(truth)
    print(f"planted pairs: {len(truth)} at J >= {threshold}; found {len(predicted)}; "
          f"precision {precision:.3f} recall {recall:.3f}")  # fmt: skip
    assert precision >= 0.9 and recall >= 0.8, (precision, recall)
    # the misses and false alarms are pairs near the threshold, where the signature's estimate is noisy (standard
    # deviation 0.035 at 0.8 with 128 permutations, so a pair at 0.85 is missed ~6% of the time); away from it, few
    clear = {(i, j) for i, j in combinations(range(len(docs)), 2) if abs(jaccard(sets[i], sets[j]) - threshold) >= 0.05}
    clear_truth, clear_predicted = truth & clear, predicted & clear
    clear_hits = len(clear_predicted & clear_truth)
    clear_precision, clear_recall = clear_hits / len(clear_predicted), clear_hits / len(clear_truth)
    print(f"pairs at least 0.05 from the threshold: precision {clear_precision:.3f} recall {clear_recall:.3f}")
    assert clear_precision >= 0.95 and clear_recall >= 0.95, (clear_precision, clear_recall)
    for i, j in predicted ^ truth:
        assert abs(jaccard(sets[i], sets[j]) - threshold) < 0.1, (i, j, jaccard(sets[i], sets[j]))


def test_near_duplicates_dropped_with_their_kept_twin(tmp_path):
    rng = random.Random(1)
    originals = [prose(rng) for _ in range(20)]
    near = []
    for text in originals[:5]:  # one word changed: Jaccard about 0.92
        words = text.split(" ")
        words[30] = "zebra"
        near.append(" ".join(words))
    report = clean([str(write_jsonl(tmp_path / "web.jsonl", originals + near))], tmp_path / "out")
    assert report.dropped == {"near_duplicate": 5} and report.kept == 20
    kept = {text for _, text in kept_records(tmp_path / "out")}
    for a, b in zip(originals[:5], near, strict=True):
        assert (a in kept) != (b in kept)  # exactly one of each pair
    example = report.examples["near_duplicate"][0]
    assert "estimated Jaccard" in example["detail"] and example["kept"]["source"] == "web"


# ---- exact dedup ------------------------------------------------------------------------------------------


def test_exact_duplicates_after_light_normalisation(tmp_path):
    rng = random.Random(2)
    texts = [prose(rng) for _ in range(10)]
    copies = [texts[0], texts[1].upper(), "  " + texts[2].replace(" ", "   ").replace("\n", " \n\n ") + "\n"]
    report = clean([str(write_jsonl(tmp_path / "a.jsonl", texts + copies))], tmp_path / "out", quality=False)
    assert report.dropped == {"exact_duplicate": 3} and report.kept == 10 and report.documents == 13
    assert len(report.examples["exact_duplicate"]) == 3
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["dropped"] == {"exact_duplicate": 3} and saved["outputs"] == ["a.jsonl"]


# ---- quality rules ----------------------------------------------------------------------------------------


def _permissive() -> dict[str, float]:
    """Thresholds that drop nothing."""
    out: dict[str, float] = {}
    for f in dataclasses.fields(QualityThresholds):
        if f.name.startswith("min_"):
            out[f.name] = 0
        elif f.name.startswith("max_frac"):
            out[f.name] = 1.0
        else:
            out[f.name] = 10**9
    return out


def _bad_documents() -> dict[str, str]:
    rng = random.Random(3)
    good = prose(rng)
    words = good.replace("\n", " ").split()
    lines = good.splitlines()
    two = ["".join(rng.choice("abcdefgh") for _ in range(2)) for _ in range(120)]
    long = ["".join(rng.choice("abcdefgh") for _ in range(14)) for _ in range(120)]
    return {
        "too_few_words": " ".join(words[:20]),
        "too_many_words": " ".join(words * 900),  # 108,000 words
        "mean_word_length_low": " ".join(two),
        "mean_word_length_high": " ".join(long),
        "symbol_to_word_ratio": " ".join(w if i % 4 else "#" + w for i, w in enumerate(words)),
        "lines_end_with_ellipsis": "\n".join(line[:-1] + ("..." if i % 2 else ".") for i, line in enumerate(lines)),
        "lines_start_with_bullet": "\n".join("\u2022 " + line for line in lines),
        "duplicate_lines": "\n".join(lines + [lines[0]] * 5),
        "duplicate_line_chars": "\n".join([*(" ".join(words[i : i + 2]) for i in range(0, 40, 2)), *[lines[-1]] * 2]),
        "duplicate_paragraphs": "\n\n".join(lines + [lines[0]] * 5),
        "duplicate_paragraph_chars": "\n\n".join(
            [*(" ".join(words[i : i + 2]) for i in range(0, 40, 2)), *[" ".join(lines[-3:])] * 2]
        ),
        "top_2gram_chars": " ".join(w + " alpha beta" if i % 3 == 0 else w for i, w in enumerate(words)),
        "top_3gram_chars": " ".join(w + " alpha beta gamma" if i % 4 == 0 else w for i, w in enumerate(words)),
        "top_4gram_chars": " ".join(w + " alpha beta gamma delta" if i % 5 == 0 else w for i, w in enumerate(words)),
        "few_alphabetic_words": " ".join(w if i % 3 else str(1000 + i) for i, w in enumerate(words)),
    }


def test_the_good_document_passes_every_default_rule():
    signals = quality_signals(prose(random.Random(3)))
    assert quality_verdict(signals, QualityThresholds()) is None, signals


@pytest.mark.parametrize("reason", [rule[0] for rule in QUALITY_RULES])
def test_each_quality_rule_drops_what_it_should(reason):
    text = _bad_documents()[reason]
    [(_, signal, _, name)] = [rule for rule in QUALITY_RULES if rule[0] == reason]
    signals = quality_signals(text)
    # the default thresholds drop it, and with every other rule off this rule is the one that does
    assert quality_verdict(signals, QualityThresholds()) is not None, signals
    only = {**_permissive(), name: getattr(QualityThresholds(), name)}
    verdict = quality_verdict(signals, QualityThresholds(**only))
    assert verdict is not None and verdict[0] == reason and verdict[1].startswith(signal), (verdict, signals)
    # and with this rule off too, nothing drops it
    assert quality_verdict(signals, QualityThresholds(**_permissive())) is None


def test_signal_values_on_a_small_example():
    text = "# Title\n- one item here...\n- one item here...\nplain words 42\n\nplain words 42\n\nplain words 42"
    s = quality_signals(text)
    assert s["word_count"] == 16  # normalised words: title, one item here x2, plain words 42 x3
    assert s["mean_word_length"] == pytest.approx((5 + 2 * 11 + 3 * 12) / 16)
    assert s["frac_lines_start_with_bullet"] == pytest.approx(2 / 6)
    assert s["frac_lines_end_with_ellipsis"] == pytest.approx(2 / 6)
    assert s["frac_dup_lines"] == pytest.approx(3 / 6)  # the second "- one item here...", two "plain words 42"
    assert s["frac_chars_dup_lines"] == pytest.approx((18 + 2 * 14) / (7 + 2 * 18 + 3 * 14))
    assert s["frac_dup_paragraphs"] == pytest.approx(1 / 3)  # the first block, then "plain words 42" twice
    assert s["symbol_to_word_ratio"] == pytest.approx(3 / 19)  # one "#", two "..." over 19 raw words
    assert s["frac_alphabetic_words"] == pytest.approx(13 / 19)  # "#", "-" x2, "42" x3 have no letter
    # "plain words" occurs 3 times: 3 * 10 characters of 5 + 2 * 11 + 3 * 12 = 63
    assert s["frac_chars_top_2gram"] == pytest.approx(max(3 * 10, 3 * 7) / 63)


def test_quality_drops_are_reported_with_reasons(tmp_path):
    rng = random.Random(4)
    bad = _bad_documents()
    texts = [prose(rng) for _ in range(5)] + [bad["too_few_words"], bad["lines_start_with_bullet"]]
    report = clean([str(write_jsonl(tmp_path / "a.jsonl", texts))], tmp_path / "out")
    assert report.dropped == {"too_few_words": 1, "lines_start_with_bullet": 1} and report.kept == 5
    assert report.examples["too_few_words"][0]["detail"] == "word_count=20 (< 50)"
    # --no-quality keeps them; a changed threshold drops by it
    assert clean([str(tmp_path / "a.jsonl")], tmp_path / "all", quality=False).kept == 7
    relaxed = QualityThresholds(max_frac_lines_start_with_bullet=1.0)
    assert clean([str(tmp_path / "a.jsonl")], tmp_path / "relaxed", thresholds=relaxed).dropped == {"too_few_words": 1}


def test_thresholds_parse_and_refuse():
    assert QualityThresholds.parse(["min_words=20", "max-frac-dup-lines=0.5"]).min_words == 20
    for bad in (["nope=1"], ["min_words"], ["min_words=abc"], ["max_frac_dup_lines=2"], ["min_words=-1"]):
        with pytest.raises(UserError):
            QualityThresholds.parse(bad)


# ---- determinism, output, bad input ------------------------------------------------------------------------


def _mixed_corpus(rng: random.Random) -> list[str]:
    texts = [prose(rng) for _ in range(30)]
    texts += texts[:4]  # exact
    texts += [t.replace(t.split(" ")[5], "zebra", 1) for t in texts[4:10]]  # near
    texts += [_bad_documents()["too_few_words"]]
    return texts


def test_kept_set_does_not_depend_on_order_or_sharding(tmp_path):
    texts = _mixed_corpus(random.Random(5))
    a = write_jsonl(tmp_path / "a.jsonl", texts[::2])
    b = write_jsonl(tmp_path / "b.jsonl", texts[1::2])
    first = clean([str(a), str(b)], tmp_path / "o1")
    shuffled = list(texts)
    random.Random(6).shuffle(shuffled)
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in shuffled[: len(shuffled) // 3]))
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in shuffled[len(shuffled) // 3 :]))
    second = clean([str(b), str(a)], tmp_path / "o2")
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(4):
        write_jsonl(shards / f"part-{k}.jsonl", shuffled[k::4])
    third = clean([str(shards)], tmp_path / "o3")
    texts_of = [{t for _, t in kept_records(tmp_path / o)} for o in ("o1", "o2", "o3")]
    assert texts_of[0] == texts_of[1] == texts_of[2]
    assert first.kept == second.kept == third.kept == 30
    assert first.dropped == second.dropped == third.dropped
    assert first.dropped == {"too_few_words": 1, "exact_duplicate": 4, "near_duplicate": 6}
    for other in (second, third):  # the same examples, picked by content hash
        assert {k: [e["text"] for e in v] for k, v in first.examples.items()} == {
            k: [e["text"] for e in v] for k, v in other.examples.items()
        }


def test_output_is_what_data_prepare_reads(tmp_path):
    from slmkit.data.prepare import prepare

    texts = _mixed_corpus(random.Random(7))
    report = clean([str(write_jsonl(tmp_path / "web.jsonl", texts))], tmp_path / "clean")
    lines = (tmp_path / "clean" / "web.jsonl").read_text().splitlines()
    assert len(lines) == report.kept and all(json.loads(line)["source"] == "web" for line in lines)
    # kept documents are written in reading order
    positions = [texts.index(json.loads(line)["text"]) for line in lines]
    assert positions == sorted(positions)
    meta = prepare([str(tmp_path / "clean")], tmp_path / "data", vocab_size=300, val_fraction=0)
    assert meta["splits"]["train"]["documents"] == report.kept


def test_cli_json_and_refusals(tmp_path, capsys):
    texts = _mixed_corpus(random.Random(8))
    src = write_jsonl(tmp_path / "web.jsonl", texts)
    r = run_slm("data", "clean", src, "--out", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["kept"] == 30 and report["dropped"]["near_duplicate"] == 6

    def refused(*args, fragment):  # in this process (a fresh one per case costs seconds): the same `run`
        code = run(["data", "clean", *map(str, args)])
        result = capsys.readouterr()
        assert code == 2, result.out + result.err
        [line] = result.err.strip().splitlines()
        assert line.startswith("error: ") and fragment in line, line

    refused(src, "--out", tmp_path / "out", fragment="already exists")  # never overwritten silently
    r = run_slm("data", "clean", src, "--out", tmp_path / "out", "--overwrite", "--no-quality", "--json")
    assert r.returncode == 0 and "too_few_words" not in json.loads(r.stdout)["dropped"]
    refused(tmp_path / "missing.jsonl", "--out", tmp_path / "o1", fragment="does not exist")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["   ", "\n"])
    refused(empty, "--out", tmp_path / "o2", fragment="empty corpus")
    for bad in ("0", "1", "1.5", "-0.2"):
        refused(src, "--out", tmp_path / "o3", "--near-dup-threshold", bad, fragment="near-dup-threshold")
    refused(src, "--out", tmp_path / "o4", "--threshold", "bogus=1", fragment="--threshold")
    refused(write_jsonl(tmp_path / "short.jsonl", ["too short"]), "--out", tmp_path / "o5", fragment="dropped")
    assert not (tmp_path / "o5").exists()  # nothing written when nothing survives


def test_missing_datasketch_is_one_error_line(tmp_path):
    import subprocess

    src = write_jsonl(tmp_path / "web.jsonl", [prose(random.Random(9))])
    code = (
        f"import sys; sys.modules['datasketch'] = None; sys.path.insert(0, {str(SRC)!r}); from slmkit.cli import run; "
        f"sys.exit(run(['data', 'clean', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "pip install 'datasketch>=1.6'" in line, line
