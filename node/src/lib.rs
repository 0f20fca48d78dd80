//! tandem-node: the glue between the core engine and the outside world: model fetching, the
//! OpenAI-compatible server and the command-line programs.

pub mod bench;
pub mod loadgen;
pub mod models;
pub mod serve;
