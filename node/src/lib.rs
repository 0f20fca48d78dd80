//! tandem-node: the glue between the core engine and the outside world: model fetching, the
//! OpenAI-compatible server and the command-line programs.

pub mod bench;
/// The desktop app's state, views and node runner (`tandem-desktop`).
#[cfg(feature = "desktop")]
pub mod desktop;
pub mod loadgen;
pub mod models;
pub mod serve;
