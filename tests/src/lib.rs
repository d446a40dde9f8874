//! End-to-end test crate; the tests live in `tests/e2e`, the benchmarks in `benches/`. The library holds what
//! both use: [`wire`], Ferry's agent wire protocol spoken with a real certificate, and [`bench`], the benchmarks'
//! processes.

pub mod bench;
pub mod wire;
