//! tandem-node: the glue between the core engine and the outside world: model fetching and the
//! command-line programs.

pub mod bench;
pub mod models;
