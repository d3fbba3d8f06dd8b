"""The filter's working set on disk, so that its memory does not grow with the number of candidates.

At the paper's scale (454k caption pairs, many candidates each) a list of every scored candidate, a set
of seen ids and the score lists for the plot do not fit a small machine. Instead each scored candidate
becomes one row of a temporary SQLite table; SQLite dedups it (primary key), ranks survivors per caption
pair and orders the split groups with its own on-disk sorts. The rules are the in-memory ones of
`filtering.select` (`select`, `assign_splits`), which the tests hold this against:

  - survivors (no failed threshold) ranked per caption pair by clip_sim_dir, best first, missing or NaN
    last, ties by lower seed; the first top_k are kept, the rest rejected as over_top_k;
  - split groups ordered by (stable_seed(split_seed, "split", group), group) and cut into consecutive
    runs of split_counts' sizes, in the order the splits are listed;
  - kept rows come out per split in caption-pair order, then rank.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

from ip2p.errors import sqlite_full
from ip2p.filtering.select import split_counts
from ip2p.io.stage import stable_seed

_SCHEMA = """
CREATE TABLE candidate (
    id TEXT PRIMARY KEY, pair_id TEXT NOT NULL, grp TEXT, seed INTEGER NOT NULL, failure TEXT,
    sim_dir REAL,      -- the ranking key; SQLite stores NaN as NULL, which ranks last as NaN should
    scores TEXT,       -- the four scores as JSON (keeps NaN and None apart for the dataset)
    record TEXT        -- what the dataset row needs besides the images, and the images' reference
);
CREATE TABLE grp (name TEXT PRIMARY KEY, key INTEGER NOT NULL) WITHOUT ROWID;
"""


class Spool:
    """`add` every candidate as it streams by; then `rejections`, `assign_splits`, `kept(split)`.
    Use as a context manager: the temporary folder is removed on exit (a kill leaves a hidden
    `.<name>.spool-*` folder beside the output, like atomic_folder's staging)."""

    def __init__(self, beside: str | Path, split_seed: int, cache_mib: int = 64):
        beside = Path(beside)
        beside.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}.spool-", dir=beside.parent))
        self.db = sqlite3.connect(self.folder / "spool.sqlite")
        # scratch data: no journal, no fsync; sorts spill to files, the page cache is capped
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size=-{1024 * cache_mib}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)
        self.split_seed = split_seed
        self._split_table = False
        self._ranked_table = False

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        full = sqlite_full(exc, self.folder / "spool.sqlite") if exc is not None else None
        if full is not None and full is not exc:
            raise full from exc  # one line naming where the disk filled up

    def add(self, cid: str, pair_id: str, seed: int, group: str | None, failure: str | None,
            scores: Mapping[str, Any] | None, record: Mapping[str, Any]) -> bool:
        """Store one candidate; False (nothing stored) if its id was seen before. group None: the
        candidate takes no part in the split draw (unreadable)."""
        assert not self._ranked_table, "every add comes before the first ranking"
        sim_dir = None if scores is None else scores.get("clip_sim_dir")
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO candidate VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, pair_id, group, int(seed), failure, sim_dir,
             None if scores is None else json.dumps(dict(scores)), json.dumps(dict(record))))
        if cursor.rowcount == 0:
            return False
        if group is not None:
            self.db.execute("INSERT OR IGNORE INTO grp VALUES (?, ?)",
                            (group, stable_seed(self.split_seed, "split", group)))
        return True

    def _ranked(self) -> str:
        """The survivors ranked within their caption pair, sorted once (after the last add) into a table
        that every later query reads."""
        if not self._ranked_table:
            self.db.execute("CREATE TABLE ranked AS SELECT id, pair_id, grp, ROW_NUMBER() OVER (PARTITION BY pair_id "
                            "ORDER BY sim_dir IS NULL, sim_dir DESC, seed) AS rank FROM candidate WHERE failure IS NULL")
            self._ranked_table = True
        return "ranked"

    def rejections(self, top_k: int) -> Counter:
        """Rejected candidates by reason: their first failure, or over_top_k."""
        out = Counter(dict(self.db.execute(
            "SELECT failure, COUNT(*) FROM candidate WHERE failure IS NOT NULL GROUP BY failure")))
        over = self.db.execute(f"SELECT COUNT(*) FROM {self._ranked()} WHERE rank > ?", (top_k,)).fetchone()[0]
        if over:
            out["over_top_k"] += over
        return out

    def count(self, what: str, top_k: int | None = None) -> int:
        """scored (candidates with scores), pairs_in (caption pairs met), pairs_out (pairs with a kept row)."""
        query = {"scored": "SELECT COUNT(*) FROM candidate WHERE grp IS NOT NULL",
                 "pairs_in": "SELECT COUNT(DISTINCT pair_id) FROM candidate",
                 "pairs_out": f"SELECT COUNT(DISTINCT pair_id) FROM {self._ranked()} WHERE rank <= :k"}[what]
        return self.db.execute(query, {"k": top_k}).fetchone()[0]

    def assign_splits(self, fractions: Mapping[str, float], given: Mapping[str, str] | None = None) -> None:
        """Every group -> a split: drawn (seeded order, cut by split_counts), or `given` (a release's own
        split by folder; groups it does not list, or lists under a split not in `fractions`, get none)."""
        self.db.execute("CREATE TABLE split (name TEXT PRIMARY KEY, split TEXT NOT NULL) WITHOUT ROWID")
        if given is not None:
            self.db.executemany("INSERT INTO split VALUES (?, ?)",
                                ((g, s) for g, s in given.items() if s in fractions))
        else:
            total = self.db.execute("SELECT COUNT(*) FROM grp").fetchone()[0]
            start, cases = 0, []
            for name, count in split_counts(total, fractions).items():
                cases.append((start, start + count, name))
                start += count
            # consecutive runs of the seeded order (0-based position r)
            self.db.execute("CREATE TABLE ordered AS SELECT name, ROW_NUMBER() OVER (ORDER BY key, name) - 1 AS r "
                            "FROM grp")
            for lo, hi, name in cases:
                self.db.execute("INSERT INTO split SELECT name, ? FROM ordered WHERE r >= ? AND r < ?", (name, lo, hi))
            self.db.execute("DROP TABLE ordered")
        self._split_table = True

    def kept(self, split: str, top_k: int) -> Iterator[dict]:
        """The kept candidates of one split, in caption-pair order, then rank: dicts of the record's
        fields plus id, pair_id, seed and `scores`."""
        assert self._split_table, "assign_splits first"
        rows = self.db.execute(
            f"SELECT c.id, c.pair_id, c.seed, c.scores, c.record FROM {self._ranked()} AS r "
            "JOIN candidate AS c ON c.id = r.id JOIN split AS s ON s.name = r.grp "
            "WHERE r.rank <= ? AND s.split = ? ORDER BY r.pair_id, r.rank",
            (top_k, split))
        for cid, pair_id, seed, scores, record in rows:
            yield {**json.loads(record), "id": cid, "pair_id": pair_id, "seed": seed, "scores": json.loads(scores)}
