"""Development tools, kept out of the installed packages: the local stack (`stack`: redis-server,
moto's S3 server over HTTP, worker processes) that the demo, the tests and the benchmarks start, and
the demo itself (`./bootstrap demo`). Run from the repository's root; they need the `dev` extra."""
