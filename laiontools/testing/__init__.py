"""Fixtures shared by the tests and the benchmarks (not used by the stages)."""

# Settings every test download uses: fast failures, small shards, only loopback allowed. Tests import it
# from here, not from a conftest (two conftest.py files in tests/ would make `from conftest import` ambiguous).
TEST_DOWNLOAD_SETTINGS = dict(
    allow_networks=["127.0.0.0/8"], number_sample_per_shard=20, shards_per_file=2, timeout=2, retries=0,
    image_size=64, thread_count=16,
)
