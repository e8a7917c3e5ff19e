//! The engine: tokens in, tokens out. [`Engine`] runs the continuous-batching loop on its own
//! thread (`worker`), fed through [`EngineHandle`] (`handle`); the `scheduler` decides which
//! tokens run each step with fair share between tenants (`fair`); `sequence` is one request's
//! state; `sampler` picks tokens. `generate` is the single-sequence path the CLI uses.

pub mod device_budget;
mod fair;
pub mod generate;
mod handle;
mod observe;
pub mod paged;
pub mod request;
pub mod sampler;
pub mod scheduler;
mod sequence;
mod worker;

pub use handle::{Engine, EngineHandle, EngineStats, Submission};
pub use request::{EngineError, EngineEvent, EngineRequest, KvChoice, StopParams, Usage};
