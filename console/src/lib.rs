//! The tandem cluster console: a plain [`state::ClusterState`] fed by cluster snapshots, egui
//! views of it, the feed that joins the mesh (or polls a node) and sends operators' commands, and
//! the eframe app that ties them together. Knows nothing of GPUs or models.

pub mod app;
pub mod screenshot;
pub mod source;
pub mod state;
pub mod views;
