"""A removal list hitting a downloaded pool, for the takedown tests (kill, object store)."""

from __future__ import annotations

import os


def removal_list_for(catalog_dir: str, shards: int, path: str) -> tuple[list[str], str]:
    """Write to `path` a list naming, by uid, the first downloaded sample (by uid) of each of the pool's
    first `shards` shards, and by url the second sample of the first shard. Returns (uids, url)."""
    import pandas as pd

    cat = pd.read_parquet(catalog_dir)
    succ = cat[cat["status"] == "success"].sort_values("uid")
    ids = sorted(succ["shard"].unique())
    assert len(ids) >= shards, f"the pool has {len(ids)} shards, the list needs {shards}"
    uids = [succ[succ["shard"] == s]["uid"].iloc[0] for s in ids[:shards]]
    url = succ[succ["shard"] == ids[0]]["url"].iloc[1]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"uid {u}\n" for u in uids) + f"url {url}\n")
    return uids, url
