//! Benchmarks for mabe live in `benches/`.
