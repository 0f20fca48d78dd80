//! Where a request runs: every plan for it, best first, from this node's view of the mesh (its
//! own entry refreshed first), with prefix affinity and the predicted output length; and which
//! nodes could continue this node's decodes.

use tandem_mesh::{PeerId, Placement, PlacementMode, PlacementRequest, Role};

use super::node_mesh::refresh_own;
use super::{App, Loaded};

/// The output budget assumed for prediction when a request sets none.
const DEFAULT_MAX_TOKENS: usize = 256;

/// What placement needs of a request, read from its body without a tokenizer.
pub struct RequestShape {
    pub model: String,
    pub prompt_tokens: usize,
    /// The request's output budget, if it set one.
    pub max_tokens: Option<usize>,
    /// Hash of the conversation's opening, so later turns go where the earlier ones are cached.
    pub affinity_key: u64,
}

impl RequestShape {
    /// The output budget the length predictor assumes.
    pub fn budget(&self) -> usize {
        self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)
    }
}

/// Every plan for the request, best first.
pub fn plan(app: &App, shape: &RequestShape, exclude: &[PeerId]) -> Vec<Placement> {
    plan_with(app, shape, exclude, app.cfg.placement)
}

/// `plan`, choosing among the plans `mode` allows.
pub fn plan_with(app: &App, shape: &RequestShape, exclude: &[PeerId], mode: PlacementMode) -> Vec<Placement> {
    refresh_own(app);
    let affinity = app.mesh.affinity_of(shape.affinity_key);
    let output_tokens = app.mesh.predicted_output(&shape.model, shape.prompt_tokens, shape.budget());
    let req = PlacementRequest { model: &shape.model, prompt_tokens: shape.prompt_tokens, output_tokens, affinity, exclude, mode };
    let view = app.mesh.handle.view();
    let view = view.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut plans = tandem_mesh::place(&view, &req);
    // Chains of nodes holding spans come after every node that holds the whole model: one node
    // has no hops between stages. A chain is placed on its first stage, which drives it.
    for c in tandem_mesh::chains(&view, &req) {
        let Some(head) = c.stages.first() else { continue };
        if !plans.iter().any(|p| p.peer == head.peer) {
            plans.push(Placement {
                peer: head.peer,
                is_self: head.is_self,
                fingerprint: c.fingerprint.clone(),
                prefill: None,
                expected_ttft_s: c.expected_ttft_s,
                expected_tpot_s: c.expected_tpot_s,
            });
        }
    }
    plans
}

/// Other nodes that could continue this node's decodes: connected, serving the same model with
/// the same fingerprint, kernel mode and K/V cache dtype (the moved K/V stays exact and the
/// request's tokens as they would have been here), in a decode role, not draining.
pub fn decode_targets(app: &App, loaded: &Loaded, tokens: usize) -> Vec<Placement> {
    let shape = RequestShape { model: loaded.model_id.clone(), prompt_tokens: tokens, max_tokens: None, affinity_key: 0 };
    let me = app.mesh.handle.peer_id();
    let plans = plan_with(app, &shape, &[me], PlacementMode::Colocated);
    let snap = app.mesh.handle.snapshot();
    let (deterministic, kv_dtype) = (app.cfg.deterministic, loaded.kv_dtype.to_string());
    plans
        .into_iter()
        .filter(|p| {
            p.fingerprint == loaded.fingerprint
                && snap.nodes.iter().any(|n| {
                    n.peer_id == p.peer.to_string()
                        && matches!(n.role, Some(Role::Decode | Role::Both))
                        && n.models.iter().any(|m| {
                            m.fingerprint == loaded.fingerprint
                                && m.deterministic == deterministic
                                && m.kv_dtype == kv_dtype
                                && m.span.is_none()
                        })
                })
        })
        .collect()
}
