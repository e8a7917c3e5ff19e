//! kvserve: an OpenAI-compatible, multi-tenant LLM inference server built around its KV cache.
//!
//! Layers (imports point down only): `engine` → `model` → `backend` → (`types`, `error`).

pub mod backend;
pub mod calibrate;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fuzzing;
pub mod http;
pub mod kv;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod server;
pub mod tenancy;
pub mod types;
