//! Log output: `RUST_LOG`-style filters, as human-readable text or one JSON object per line
//! (with the current span's fields and the span list, so every event of a request carries its
//! `id` and `tenant`). Logs show ids, tenants and lengths, never prompt or completion text.

use std::str::FromStr;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format `{other}` (text or json)")),
        }
    }
}

/// A subscriber that writes events passing `filter` (e.g. `info,kvserve::engine=debug`) to
/// `writer` in `format`. Install it with `tracing::subscriber::set_global_default`.
pub fn subscriber<W>(
    filter: &str,
    format: LogFormat,
    writer: W,
) -> Result<Box<dyn tracing::Subscriber + Send + Sync>, String>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("bad log filter `{filter}`: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    Ok(match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_bad_filters_are_refused() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("TEXT".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
        assert!(subscriber("info,kvserve=debug", LogFormat::Json, std::io::sink).is_ok());
        assert!(subscriber("kvserve=loud", LogFormat::Text, std::io::sink).is_err());
    }
}
