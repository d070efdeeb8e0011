import json

import numpy as np
import pytest

from pippin.data.shards import INDEX_FILE, ShardWriter, read_shards
from pippin.errors import PippinError


def test_documents_round_trip_with_eos_and_windows_stay_in_a_shard(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 70000, size=int(n)).tolist() for n in rng.integers(1, 30, size=20)]
    w = ShardWriter(tmp_path, vocab_size=70000, eos_id=0, shard_tokens=50, meta={"source": "test"})
    for d in docs:
        w.add(d)
    w.close()
    s = read_shards(tmp_path)
    assert s.index["dtype"] == "uint32" and s.index["source"] == "test" and len(s.arrays) > 1
    flat = np.concatenate([np.asarray(a) for a in s.arrays]).tolist()
    assert flat == [t for d in docs for t in [*d, 0]] and s.n_tokens == len(flat)
    L = 7
    expect = [np.asarray(a[i * (L + 1) : (i + 1) * (L + 1)]).tolist() for a in s.arrays for i in range(a.size // (L + 1))]
    assert s.n_windows(L) == len(expect) and [s.window(i, L).tolist() for i in range(len(expect))] == expect
    with pytest.raises(IndexError):
        s.window(len(expect), L)


def test_unfinished_or_tampered_sets_are_refused(tmp_path):
    w = ShardWriter(tmp_path, vocab_size=100, eos_id=99, shard_tokens=8)
    w.add([1, 2, 3])
    with pytest.raises(PippinError, match="outside"):
        w.add([100])
    with pytest.raises(PippinError, match="no shards.json"):
        read_shards(tmp_path)  # never closed: no index
    w.close()
    assert read_shards(tmp_path).index["dtype"] == "uint16"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["shards"][0]["n_tokens"] += 1
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(PippinError, match="bytes"):
        read_shards(tmp_path)
