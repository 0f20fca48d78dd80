//! How many tokens a request will generate, predicted before it runs (TetriInfer), so decode
//! placement reserves room for the whole generation instead of the prompt alone and does not
//! pack one node with long generators. The model is deliberately simple: the mean output length
//! of past requests of the same model, bucketed by prompt length and `max_tokens` (powers of
//! two), updated online; an empty bucket falls back to the model's overall mean, then to half of
//! `max_tokens`. The predictor keeps its own error (mean absolute, in tokens) so operators see how
//! much to trust it.

use std::collections::HashMap;

/// Weight of a new observation in a bucket's mean once the bucket has seen this many.
const WINDOW: f64 = 64.0;
/// Models remembered (bounded: model ids come from clients).
const MAX_MODELS: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
struct Mean {
    n: f64,
    mean: f64,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.n = (self.n + 1.0).min(WINDOW);
        self.mean += (x - self.mean) / self.n;
    }
}

/// Online output-length predictor.
#[derive(Debug, Default)]
pub struct LengthPredictor {
    buckets: HashMap<(String, u32, u32), Mean>,
    models: HashMap<String, Mean>,
    abs_error: f64,
    observed: u64,
}

fn bucket(n: usize) -> u32 {
    usize::BITS - n.max(1).leading_zeros()
}

impl LengthPredictor {
    /// Expected output tokens of a request, at most `max_tokens`.
    pub fn predict(&self, model: &str, prompt_tokens: usize, max_tokens: usize) -> usize {
        let key = (model.to_string(), bucket(prompt_tokens), bucket(max_tokens));
        let guess = match (self.buckets.get(&key), self.models.get(model)) {
            (Some(b), _) => b.mean,
            (None, Some(m)) => m.mean,
            (None, None) => max_tokens as f64 / 2.0,
        };
        (guess.round() as usize).clamp(1, max_tokens.max(1))
    }

    /// Learns from a finished request.
    pub fn observe(&mut self, model: &str, prompt_tokens: usize, max_tokens: usize, output_tokens: usize) {
        let predicted = self.predict(model, prompt_tokens, max_tokens);
        self.observed += 1;
        self.abs_error += ((predicted as f64 - output_tokens as f64).abs() - self.abs_error) / (self.observed as f64).min(WINDOW * 4.0);
        if !self.models.contains_key(model) && self.models.len() >= MAX_MODELS {
            return;
        }
        let x = output_tokens as f64;
        self.models.entry(model.to_string()).or_default().add(x);
        self.buckets.entry((model.to_string(), bucket(prompt_tokens), bucket(max_tokens))).or_default().add(x);
    }

    /// Mean absolute error of recent predictions, in tokens (None before any).
    pub fn mean_abs_error(&self) -> Option<f64> {
        (self.observed > 0).then_some(self.abs_error)
    }

    pub fn observed(&self) -> u64 {
        self.observed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_per_bucket_and_measures_its_error() {
        let mut p = LengthPredictor::default();
        assert_eq!(p.predict("m", 100, 256), 128, "no history: half of max_tokens");
        assert_eq!(p.mean_abs_error(), None);
        // Short prompts with a large budget answer long; long prompts answer briefly.
        for _ in 0..50 {
            p.observe("m", 20, 512, 400);
            p.observe("m", 3000, 512, 30);
        }
        assert_eq!(p.predict("m", 20, 512), 400);
        assert_eq!(p.predict("m", 3000, 512), 30);
        assert_eq!(p.predict("m", 20, 16), 16, "never more than max_tokens");
        let err = p.mean_abs_error().expect("observed");
        assert!(err < 60.0, "the error falls once the buckets have learnt: {err}");
        // An unseen bucket of a known model takes the model's mean.
        let mean = p.predict("m", 300, 512);
        assert!((200..=230).contains(&mean), "{mean}");
        // Changed behaviour is followed.
        for _ in 0..300 {
            p.observe("m", 20, 512, 50);
        }
        assert!(p.predict("m", 20, 512) < 60);
    }

    #[test]
    fn models_are_bounded() {
        let mut p = LengthPredictor::default();
        for i in 0..(MAX_MODELS + 10) {
            p.observe(&format!("m{i}"), 10, 10, 5);
        }
        assert_eq!(p.models.len(), MAX_MODELS);
    }
}
