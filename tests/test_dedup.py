"""Near-duplicate machinery: vectorised signatures against brute force, buckets, components, planted duplicates,
metadata, partition / chunking invariance, and in-process = Ray."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.io import caption_sources
from pipeline.stages.captions import dedup, textsig
from pipeline.stages.captions.build import CaptionsConfig, CaptionsStage


def lev(a: list[str], b: list[str]) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def osa(a: list[str], b: list[str]) -> int:
    """Word edit distance with an adjacent transposition as one edit (optimal string alignment), written plainly."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def swapped(a: list[str], b: list[str]) -> bool:
    """b is a with two adjacent, different words swapped."""
    diff = [i for i in range(len(a)) if len(a) == len(b) and a[i] != b[i]]
    return len(diff) == 2 and diff[1] == diff[0] + 1 and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])


def jaccard(a: str, b: str, n: int = 2) -> float:
    grams = lambda t: {" ".join(t.split()[i : i + n]) for i in range(max(1, len(t.split()) - n + 1))}
    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


def small_vocab_captions(n: int, seed: int) -> list[str]:
    """Captions over a 5-word vocabulary: every edit distance and repeated words occur."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(["a", "b", "c", "d", "e"]) for _ in range(rng.randint(1, 6))) for _ in range(n)]


def test_pair_edits_and_jaccard_match_brute_force():
    caps = small_vocab_captions(150, 0)
    tokens, offsets = textsig.tokenize(caps)
    a, b = (np.array(x) for x in zip(*itertools.product(range(150), repeat=2), strict=True))
    edits = textsig.pair_edits(tokens, offsets, a, b)  # a transposition is one edit
    assert edits.tolist() == [min(osa(caps[i].split(), caps[j].split()), 2) for i, j in zip(a, b, strict=True)]
    assert any(lev(caps[i].split(), caps[j].split()) == 2 and e == 1 for i, j, e in zip(a, b, edits, strict=True))
    swaps = textsig.pair_transposed(tokens, offsets, a, b)
    assert swaps.tolist() == [swapped(caps[i].split(), caps[j].split()) for i, j in zip(a, b, strict=True)]
    assert swaps.sum() > 20
    jac = textsig.pair_jaccard(tokens, offsets, a, b, 2)
    assert np.allclose(jac, [jaccard(caps[i], caps[j]) for i, j in zip(a, b, strict=True)], atol=1e-6)


def test_deletion_keys_equal_exactly_when_sequences_are_equal():
    caps = small_vocab_captions(200, 1)
    tokens, offsets = textsig.tokenize(caps)
    salt = np.zeros(len(caps), np.uint64)
    keys, row, pos = textsig.deletion_keys(tokens, offsets, np.arange(len(caps)), salt)
    seq = [
        tuple(caps[r].split()) if p == textsig.FULL else tuple(np.delete(caps[r].split(), p))
        for r, p in zip(row, pos, strict=True)
    ]
    by_key: dict = {}
    for k, s in zip(keys.tolist(), seq, strict=True):
        by_key.setdefault(k, set()).add(s)
    assert all(len(v) == 1 for v in by_key.values()) and len(by_key) == len(set(seq))
    salted, _, _ = textsig.deletion_keys(tokens, offsets, np.arange(len(caps)), salt + np.uint64(7))
    assert not set(salted.tolist()) & set(keys.tolist())  # a metadata salt separates the key spaces


def test_minhash_estimates_jaccard():
    a = "a big blue square on the left side of a green triangle"
    tokens, offsets = textsig.tokenize([a, a + " today", "a red circle next to a tiny yellow cross"])
    sh, owner = textsig.ngrams(tokens, offsets, 2)
    sig = textsig.minhash(sh, owner, 3, 256, seed=0)
    assert abs((sig[0] == sig[1]).mean() - 11 / 12) < 0.08 and (sig[0] == sig[2]).mean() < 0.1


def test_bucket_pairs_are_linear_in_hot_buckets():
    key = np.zeros(1000, np.uint64)  # one hot bucket of 1000 captions
    a, b, hot = dedup.window_pairs(key, np.arange(1000), np.arange(1000) % 7, window=4)
    assert len(a) == sum(1000 - d for d in range(1, 5)) and hot == 1  # not 1000 * 999 / 2
    key = np.repeat(np.arange(50, dtype=np.uint64), 3)  # small buckets: every pair
    a, b, hot = dedup.window_pairs(key, np.arange(150), np.zeros(150), window=4)
    assert len(a) == 150 and hot == 0


def greedy_reference(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    """Keep-first written plainly: in input order, a row goes when an earlier kept row is joined to it."""
    earlier: dict[int, set[int]] = {}
    for i, j in pairs:
        earlier.setdefault(max(i, j), set()).add(min(i, j))
    keeper = list(range(n))
    for y in range(n):
        kept = [x for x in earlier.get(y, ()) if keeper[x] == x]
        keeper[y] = min(kept, default=y)
    return keeper


def test_deletion_buckets_find_every_one_word_pair():
    caps = sorted(set(small_vocab_captions(300, 2)))
    tokens, offsets = textsig.tokenize(caps)
    keys, row, pos = textsig.deletion_keys(tokens, offsets, np.arange(len(caps)), np.zeros(len(caps), np.uint64))
    a, b, at = dedup.deletion_pairs(keys, row, pos)
    words = [c.split() for c in caps]
    assert all(lev(words[i], words[j]) == 1 for i, j in zip(a, b, strict=True))
    for i, j, p in zip(a.tolist(), b.tolist(), at.tolist(), strict=True):  # a substitution names its word
        assert p == -1 or (
            len(words[i]) == len(words[j]) and np.delete(words[i], p).tolist() == np.delete(words[j], p).tolist()
        )
    # The stars of substitution groups, read as cliques, and the insertion edges: keep-first over them equals
    # keep-first over the graph of all pairs one word apart.
    everything = [(i, j) for i, j in itertools.combinations(range(len(caps)), 2) if lev(words[i], words[j]) == 1]
    assert dedup.keep_first(len(caps), a, b, at).tolist() == greedy_reference(len(caps), everything)


def test_transposition_pairs_find_every_swapped_pair():
    """Equal deletion keys with the same deleted word at adjacent positions: exactly the pairs with two adjacent
    words swapped, every one of them (brute force over all pairs), with one candidate per pair and word order."""
    caps = sorted(set(small_vocab_captions(400, 3)))
    tokens, offsets = textsig.tokenize(caps)
    keys, row, pos = textsig.deletion_keys(tokens, offsets, np.arange(len(caps)), np.zeros(len(caps), np.uint64))
    word = tokens[offsets[row] + np.maximum(pos, 0)]
    a, b = textsig.transposition_pairs(keys, word, row, pos)
    words = [c.split() for c in caps]
    found = {(min(i, j), max(i, j)) for i, j in zip(a.tolist(), b.tolist(), strict=True)}
    truth = {(i, j) for i, j in itertools.combinations(range(len(caps)), 2) if swapped(words[i], words[j])}
    assert found == truth and len(truth) > 20
    assert len(a) <= 2 * len(truth)  # linear: at most one candidate per swapped word
    salted, _, _ = textsig.deletion_keys(tokens, offsets, np.arange(len(caps)), np.arange(len(caps), dtype=np.uint64))
    assert len(textsig.transposition_pairs(salted, word, row, pos)[0]) == 0  # other metadata: never a pair


def test_adjacent_transposition_is_one_edit(tmp_path):
    """Two adjacent words swapped is one edit: removed at >= --near-dup-edit-words words (a swap keeps every word,
    as an insertion or deletion does); a swap plus another edit is two edits and stays (Jaccard 7 / 17)."""
    base = "a small wooden cabin beside a frozen lake under a pale winter sky"  # 13 words
    swap = base.replace("small wooden", "wooden small")  # Jaccard 9 / 15 with base: not by the Jaccard rule
    swap_and_change = swap.replace("lake", "pond")
    short, short_swap = "a red circle above squares", "a circle red above squares"
    src = tmp_path / "swaps.jsonl"
    src.write_text("".join(json.dumps({"caption": t}) + "\n" for t in [base, swap, swap_and_change, short, short_swap]))

    def near(**kw) -> dict[str, str]:
        run(src, tmp_path / "o", **kw)
        rej = pq.read_table(tmp_path / "o" / "rejects.parquet").to_pylist()
        return {r["detail"].split(": ", 1)[1]: r["detail"].split(": ", 1)[0] for r in rej if r["reason"] == "near_dup"}

    from pipeline.stages.captions.build import caption_id

    assert near() == {swap: f"~ {caption_id(base)} (jaccard 0.600) two words swapped"}
    assert near(near_dup_change_words=0) == near()  # the swap rule is the edit-words rule, not the change rule
    assert near(near_dup_edit_words=5) == {
        **near(),
        short_swap: f"~ {caption_id(short)} (jaccard 0.143) two words swapped",
    }
    assert near(near_dup_edit_words=14, near_dup_change_words=14) == {}
    # without the swap rule the swap stays, and the swap-and-change is one word changed from it
    assert near(near_dup_edit_words=0) == {swap_and_change: f"~ {caption_id(swap)} (jaccard 0.714) one word apart"}


def test_keep_first_removes_no_chain_and_reads_groups_as_cliques():
    # 0 ~ 1 ~ 2 with 0 and 2 apart (a short caption joining two long ones): 2 stays
    assert dedup.keep_first(3, np.array([0, 1]), np.array([1, 2]), np.array([-1, -1])).tolist() == [0, 0, 2]
    # group {1, 2, 3} as the star of 1; 0 removes 1, so 2 owns the group and 3 duplicates 2
    a, b, p = np.array([0, 1, 1]), np.array([1, 2, 3]), np.array([-1, 4, 4])
    assert dedup.keep_first(4, a, b, p).tolist() == [0, 0, 2, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):  # random plain edges and groups against the plain greedy over the expanded cliques
        n = 60
        ea, eb = rng.integers(0, n, 40), rng.integers(0, n, 40)
        ga, gb, gp, pairs = [], [], [], list(zip(ea.tolist(), eb.tolist(), strict=True))
        for g in range(8):
            members = sorted(rng.choice(n, rng.integers(2, 6), replace=False).tolist())
            ga += [members[0]] * (len(members) - 1)
            gb += members[1:]
            gp += [g] * (len(members) - 1)  # (first row, position) names one group
            pairs += list(itertools.combinations(members, 2))
        a, b = np.r_[ea, ga], np.r_[eb, gb]
        p = np.r_[np.full(len(ea), -1), gp]
        keep = [i != j for i, j in zip(a.tolist(), b.tolist(), strict=True)]  # the pipeline drops self pairs
        assert dedup.keep_first(n, a[keep], b[keep], p[keep]).tolist() == greedy_reference(n, pairs)


WORDS = [f"w{i}" for i in range(3000)]


def planted(root: Path, n: int = 600, seed: int = 0) -> tuple[Path, dict]:
    """Distinct random captions (9-20 words from 3000, so >= 2 words apart), then one-word edits of some (a word
    changed, deleted, inserted, or two adjacent words swapped), short captions (< 8 words) with edits, and metadata
    twins; returns the file and what must happen."""
    rng = random.Random(seed)
    rows = [{"caption": " ".join(rng.choices(WORDS, k=rng.randint(9, 20)))} for _ in range(n)]
    rows += [{"caption": " ".join(rng.choices(WORDS, k=5))} for _ in range(50)]  # short
    edits = []
    for i in rng.sample(range(n + 50), 120):
        w = rows[i]["caption"].split()
        k = rng.randrange(len(w))
        if i % 4 == 0:
            w = [*w[:k], rng.choice(WORDS), *w[k + 1 :]]
        elif i % 4 == 1:
            w = w[:k] + w[k + 1 :]
        elif i % 4 == 2:
            w = [*w[:k], "inserted", *w[k:]]
        else:  # two adjacent words swapped
            k = min(k, len(w) - 2)
            w[k], w[k + 1] = w[k + 1], w[k]
        edits.append((i, len(rows)))
        rows.append({"caption": " ".join(w)})
    base = " ".join(rng.choices(WORDS, k=12))
    twins = len(rows)
    rows += [{"caption": base, "metadata": {"scene": 1}}, {"caption": base + " x", "metadata": {"scene": 2}}]
    rows += [{"caption": base + " y", "metadata": {"scene": 1}}]  # same scene as the first: a near duplicate
    path = root / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {"edits": edits, "n_long": n, "twins": twins}


def run(path: Path, out: Path, **kw) -> dict:
    cfg = CaptionsConfig([str(path)], str(out), n=10_000, embedder="hash", clusters=4, overwrite=True, **kw)
    return CaptionsStage.run(cfg)


def removed_rows(out: Path) -> dict[int, str]:
    rej = pq.read_table(out / "rejects.parquet").to_pylist()
    return {int(r["source"].rsplit(":", 1)[1]) - 1: r["reason"] for r in rej}


def near_dup_rule(a: str, b: str, edit_words: int = 8, change_words: int = 12) -> bool:
    """The rule, written plainly: one word inserted / deleted or two adjacent words swapped at `edit_words`, one
    word changed at `change_words`, or bigram Jaccard >= 0.8."""
    wa, wb = a.split(), b.split()
    need = change_words if len(wa) == len(wb) and not swapped(wa, wb) else edit_words
    return (osa(wa, wb) <= 1 and min(len(wa), len(wb)) >= need) or jaccard(a, b) >= 0.8


def test_planted_one_word_edits_are_removed_and_distinct_kept(tmp_path):
    path, truth = planted(tmp_path)
    caps = [json.loads(line)["caption"] for line in path.read_text().splitlines()]
    for kw in ({}, {"near_dup_change_words": 9}):
        report = run(path, tmp_path / "o", **kw)
        removed = removed_rows(tmp_path / "o")
        assert not any(i in removed for i in range(truth["n_long"] + 50))  # no distinct caption removed
        for i, e in truth["edits"]:  # every planted edit is removed exactly when the rule says so
            rule = {"change_words": kw.get("near_dup_change_words", 12)}
            assert (removed.get(e) == "near_dup") == near_dup_rule(caps[i], caps[e], **rule)
        t = truth["twins"]
        assert removed.get(t + 2) == "near_dup" and t not in removed and t + 1 not in removed  # other scene kept
        assert report["inputs"] == report["kept"] + report["removed"]
    long_edits = [e for i, e in truth["edits"] if i < truth["n_long"]]
    assert all(removed.get(e) == "near_dup" for e in long_edits)  # recall 100 % on >= 9-word captions
    off = run(path, tmp_path / "off", near_dup_edit_words=0, near_dup_change_words=0)  # the Jaccard rule alone
    assert off["removed_by_reason"].get("near_dup", 0) < 0.6 * len(long_edits)


def outputs(out: Path) -> tuple:
    shards = sorted(out.glob("part-*.parquet"))
    tables = [pq.read_table(p).to_pylist() for p in shards]
    report = json.loads((out / "report.json").read_text())
    report["near_dup"].pop("bucket_pairs")  # work done, which depends on the partitioning
    keep = ("inputs", "kept", "removed", "removed_by_reason", "shards", "near_dup")
    return (
        tables,
        pq.read_table(out / "rejects.parquet").to_pylist(),
        json.loads((out / "diversity.json").read_text()),
        {k: report[k] for k in keep},
    )


def test_outputs_do_not_depend_on_partitions_or_chunks(tmp_path, monkeypatch):
    path, _ = planted(tmp_path)
    run(path, tmp_path / "a", shard_size=200, partitions=1)
    monkeypatch.setattr(caption_sources, "CHUNK_BYTES", 4096)  # many JSONL read tasks
    run(path, tmp_path / "b", shard_size=200, partitions=7)
    assert len(caption_sources.plan_reads([path], "caption", 4096)) > 5
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    assert not (tmp_path / "a" / ".build-captions-work").exists()  # the work folder is removed


@pytest.mark.slow
def test_ray_workers_give_the_same_outputs(tmp_path):
    path, _ = planted(tmp_path)
    run(path, tmp_path / "local", shard_size=200, partitions=3, shapes=200)
    run(path, tmp_path / "ray", shard_size=200, partitions=3, shapes=200, workers=2)
    assert outputs(tmp_path / "local") == outputs(tmp_path / "ray")
