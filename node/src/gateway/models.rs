//! The models a gateway serves: the base model, and the base with each
//! LoRA adapter it can run (`MODEL:ADAPTER_ID`): those the swarm's servers
//! announce, and those in this gateway's store for the same base.
//! `GET /v1/models` lists them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nomoat_protocol::Hash;

use super::{ApiError, Backend, Gateway, MAX_LOCAL_ADAPTERS};
use crate::engine::SpanAdapter;

fn not_found(id: &str, what: String) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "the model `{id}` does not exist here; {what} (GET /v1/models lists them)"
        ),
        kind: "invalid_request_error",
        param: Some("model"),
        code: Some("model_not_found"),
    }
}

impl Gateway {
    /// The base model's id, as the swarm knows it (adapters name it).
    fn base_id(&self) -> Option<&str> {
        match &self.inner.backend {
            Backend::Swarm(s) => Some(&s.model_id),
            Backend::Local(_) => self.inner.cfg.adapters.as_ref().map(|a| a.base_id.as_str()),
        }
    }

    /// Adapters in this gateway's store for its base model.
    fn stored_adapters(&self) -> Vec<Hash> {
        let Some(src) = &self.inner.cfg.adapters else {
            return Vec::new();
        };
        let Ok(ids) = src.store.models() else {
            return Vec::new();
        };
        ids.into_iter()
            .filter(|id| {
                src.store.manifest(id).ok().is_some_and(|m| {
                    crate::weights::adapter::adapter_meta(id, &m)
                        .is_ok_and(|meta| meta.base == src.base_id)
                })
            })
            .collect()
    }

    /// Adapters the swarm's servers announce.
    fn announced_adapters(&self) -> Vec<Hash> {
        match &self.inner.backend {
            Backend::Swarm(s) => s
                .servers()
                .iter()
                .flat_map(|s| s.adapters.clone())
                .collect(),
            Backend::Local(_) => Vec::new(),
        }
    }

    /// Every adapter this gateway can run, sorted.
    pub fn adapters(&self) -> Vec<Hash> {
        let mut all = self.stored_adapters();
        all.extend(self.announced_adapters());
        all.sort();
        all.dedup();
        all
    }

    /// Every model id requests may name: the base, then `BASE:ADAPTER_ID`
    /// for each adapter.
    pub fn model_ids(&self) -> Vec<String> {
        let name = self.model_name();
        std::iter::once(name.to_string())
            .chain(
                self.adapters()
                    .iter()
                    .map(|a| format!("{name}:{}", a.to_hex())),
            )
            .collect()
    }

    /// Checks a request's `model`: the base's name (or its swarm model id),
    /// optionally with `:ADAPTER_ID`; gives the adapter.
    pub(super) fn check_model(&self, id: &str) -> Result<Option<Hash>, ApiError> {
        let (base, adapter) = match id.split_once(':') {
            Some((b, a)) => (b, Some(a)),
            None => (id, None),
        };
        let known = base == self.model_name() || self.base_id().is_some_and(|b| b == base);
        if !known {
            return Err(not_found(
                id,
                format!("this gateway serves `{}`", self.model_name()),
            ));
        }
        let Some(adapter) = adapter else {
            return Ok(None);
        };
        let hash = Hash::from_hex(adapter).map_err(|_| {
            not_found(
                id,
                format!(
                    "`{adapter}` is not an adapter id (64 hex digits from `nomoat import-adapter`)"
                ),
            )
        })?;
        if !self.adapters().contains(&hash) {
            return Err(not_found(
                id,
                format!(
                    "no server announces adapter {hash} and this gateway's store does not hold it for this model: \
                     import it with `nomoat import-adapter --model {} PATH`",
                    self.model_name()
                ),
            ));
        }
        Ok(Some(hash))
    }

    /// The parts of adapter `id` for the local model's spans, loaded once.
    pub(super) async fn local_parts(&self, id: Hash) -> Result<Vec<Arc<SpanAdapter>>, ApiError> {
        if let Some(p) = self
            .inner
            .local_adapters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(p.clone());
        }
        let (Backend::Local(model), Some(src)) = (&self.inner.backend, &self.inner.cfg.adapters)
        else {
            return Err(ApiError::internal("this gateway runs no local adapters"));
        };
        let (model, src, cfg) = (model.clone(), src.clone(), self.model_config().clone());
        let parts = tokio::task::spawn_blocking(move || {
            let w = crate::weights::open_adapter(&src.store, &id, &cfg, &src.base_id, None)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            model
                .adapter_parts(&w)
                .map_err(|e| ApiError::internal(e.to_string()))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        let mut cache = self
            .inner
            .local_adapters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_LOCAL_ADAPTERS {
            if let Some(k) = cache.keys().next().copied() {
                cache.remove(&k);
            }
        }
        cache.insert(id, parts.clone());
        Ok(parts)
    }

    /// Serves this gateway's store over `/nomoat/weights/1` from now on,
    /// so servers can fetch an adapter only this gateway holds.
    pub(super) fn serve_store(&self) {
        let (Backend::Swarm(s), Some(src)) = (&self.inner.backend, &self.inner.cfg.adapters) else {
            return;
        };
        self.inner.serving_store.call_once(|| {
            tokio::spawn(crate::weights::serve::serve_weights(
                s.net.clone(),
                src.store.clone(),
                crate::weights::serve::Fault::None,
                self.inner.shutdown.clone(),
            ));
        });
    }
}

fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "object": "model",
        "created": 0,
        "owned_by": "nomoat",
    })
}

/// `GET /v1/models`.
pub(super) async fn models(State(gw): State<Gateway>) -> Response {
    let data: Vec<_> = gw.model_ids().iter().map(|m| model_object(m)).collect();
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`.
pub(super) async fn model(
    State(gw): State<Gateway>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match gw.check_model(&id) {
        Ok(_) => Json(model_object(&id)).into_response(),
        Err(e) => e.into_response(),
    }
}
