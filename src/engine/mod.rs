//! The engine: tokens in, tokens out. Today it holds the sampler and the single-sequence
//! generation loop; the continuous-batching scheduler arrives with its own issue.

pub mod generate;
pub mod paged;
pub mod sampler;
