//! Chat templates rendered with minijinja the way Hugging Face transformers renders them
//! (`apply_chat_template`): `trim_blocks` + `lstrip_blocks`, `loopcontrols`, the
//! `raise_exception` and `strftime_now` globals, HF's `tojson` (`json.dumps` with
//! `ensure_ascii=False`), Python string/dict/list methods (`.strip()`, `.items()`, …) via
//! minijinja-contrib's pycompat, and `bos_token` / `eos_token` variables. transformers'
//! `{% generation %}` tag (assistant masks for training) renders as a plain block.
//!
//! Templates come with model files, so they are treated as untrusted: a render has a fuel
//! budget (minijinja counts instructions and created data) and a cap on output bytes, so a
//! template like `{% for i in range(10000) %}{% for j in range(10000) %}…` fails instead of
//! hanging the server.

use crate::error::ModelError;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Fuel per render: roughly instructions plus 1 per 64 bytes of data created. Real chat
/// templates use a few thousand for a long conversation.
pub const DEFAULT_FUEL: u64 = 2_000_000;
/// Largest rendered prompt accepted.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 16 << 20;

const NAME: &str = "chat_template";

/// Longest `strftime_now` format accepted.
const MAX_STRFTIME_FORMAT: usize = 1024;

/// One chat message as the template sees it (`message['role']`, `message.content`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with its special-token variables. `Send + Sync`: render from any
/// thread.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    max_output_bytes: usize,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. A syntax error is reported here, not at render time.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(DEFAULT_FUEL));
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: &str| {
            // Each directive expands to at most 9 bytes; a hostile megabyte-long format would
            // build its (uncapped) result before the output cap sees it.
            if format.len() > MAX_STRFTIME_FORMAT {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: format longer than {MAX_STRFTIME_FORMAT} bytes"),
                ));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            Ok(strftime(format, now))
        });
        env.add_template_owned(NAME, rewrite_generation_tags(source))
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        })
    }

    /// Replaces the default budget (`None` fuel: unlimited; only for trusted templates).
    pub fn with_limits(mut self, fuel: Option<u64>, max_output_bytes: usize) -> Self {
        self.env.set_fuel(fuel);
        self.max_output_bytes = max_output_bytes;
        self
    }

    /// Renders the conversation. Variables: `messages`, `add_generation_prompt`, `tools` and
    /// `documents` (none, as HF passes them), `bos_token` / `eos_token` (undefined when absent).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let tmpl = self.env.get_template(NAME).map_err(template_error)?;
        let token = |t: &Option<String>| t.as_deref().map_or(Value::UNDEFINED, Value::from);
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => Value::from(()),
            documents => Value::from(()),
            bos_token => token(&self.bos_token),
            eos_token => token(&self.eos_token),
        };
        let mut out = CappedWriter {
            buf: Vec::new(),
            cap: self.max_output_bytes,
            exceeded: false,
        };
        let rendered = tmpl.render_captured_to(ctx, &mut out).map(drop);
        if out.exceeded {
            return Err(ModelError::Template(format!(
                "rendered prompt exceeds {} bytes",
                self.max_output_bytes
            )));
        }
        rendered.map_err(template_error)?;
        String::from_utf8(out.buf).map_err(|e| ModelError::Template(e.to_string()))
    }
}

struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            self.exceeded = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The message given to `raise_exception`, carried as the error's source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// `raise_exception(msg)` becomes exactly `msg` (it is meant for the client); other errors keep
/// minijinja's one-line description (kind, detail, template line), never the template context.
/// Running out of fuel reads "engine ran out of fuel (in chat_template:N)".
fn template_error(e: Error) -> ModelError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return ModelError::Template(r.0.clone());
        }
        src = s.source();
    }
    ModelError::Template(e.to_string())
}

/// Turns transformers' `{% generation %}` / `{% endgeneration %}` into `{% if true %}` /
/// `{% endif %}`, keeping any `-`/`+` whitespace markers, so such templates compile.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            // No closing tag: the rest goes through as it is (minijinja reports the error).
            rest = tag;
            break;
        };
        let inner = &tag[2..end];
        let body = inner.trim_start_matches(['-', '+']).trim();
        let body = body.strip_suffix(['-', '+']).unwrap_or(body).trim();
        let replacement = match body {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner.replacen(body, r, 1));
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// HF's `tojson`: Python `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`: `", "` / `": "` separators, non-ASCII kept, no HTML escaping, Python float
/// repr. (minijinja's own `tojson` escapes `<`, `>`, `&`, `'`, which would change prompts.)
fn tojson(
    value: &Value,
    ensure_ascii: Option<bool>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(b) => b,
        None => ensure_ascii.unwrap_or(false),
    };
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            let ind = match v.as_str() {
                Some(s) => s.to_string(),
                // Python accepts any width; a hostile template asking for 10^12 spaces must
                // fail here, not allocate them.
                None => " ".repeat(i64::try_from(v)?.clamp(0, MAX_TOJSON_INDENT + 1) as usize),
            };
            if ind.len() > MAX_TOJSON_INDENT as usize {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent wider than {MAX_TOJSON_INDENT}"),
                ));
            }
            Some(ind)
        }
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "separators: 2 items",
            ))
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut j = PyJson {
        out: String::new(),
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    j.value(value, 0)?;
    Ok(Value::from(j.out))
}

/// Widest `tojson` indent accepted.
const MAX_TOJSON_INDENT: i64 = 256;

struct PyJson {
    out: String,
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn not_serializable(v: &Value) -> Error {
    let msg = format!("Object of type {} is not JSON serializable", v.kind());
    Error::new(ErrorKind::InvalidOperation, msg)
}

impl PyJson {
    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Error> {
        if depth > 128 {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: nesting too deep",
            ));
        }
        // Indentation and separators multiply the size of what is serialized (outside the
        // engine's fuel): stop at the size of the largest prompt.
        if self.out.len() > DEFAULT_MAX_OUTPUT_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: output exceeds {DEFAULT_MAX_OUTPUT_BYTES} bytes"),
            ));
        }
        match v.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => write!(self.out, "{v}").unwrap(),
            ValueKind::Number => self.out.push_str(&py_float(f64::try_from(v.clone())?)),
            ValueKind::String => self.string(v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.sep(i, depth + 1);
                    self.value(item, depth + 1)?;
                }
                self.close(']', items.is_empty(), depth);
            }
            ValueKind::Map => {
                let mut items = Vec::new();
                for k in v.try_iter()? {
                    // Python turns scalar keys into strings: 1 -> "1", None -> "null".
                    let key = match k.kind() {
                        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                        ValueKind::None => "null".into(),
                        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
                        ValueKind::Number if k.is_integer() => k.to_string(),
                        ValueKind::Number => py_float(f64::try_from(k.clone())?),
                        _ => return Err(not_serializable(&k)),
                    };
                    items.push((key, v.get_item(&k)?));
                }
                if self.sort_keys {
                    items.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.out.push('{');
                for (i, (k, item)) in items.iter().enumerate() {
                    self.sep(i, depth + 1);
                    self.string(k);
                    self.out.push_str(&self.key_sep);
                    self.value(item, depth + 1)?;
                }
                self.close('}', items.is_empty(), depth);
            }
            _ => return Err(not_serializable(v)),
        }
        Ok(())
    }

    fn sep(&mut self, i: usize, depth: usize) {
        if i > 0 {
            self.out.push_str(&self.item_sep);
        }
        if let Some(ind) = &self.indent {
            self.out.push('\n');
            self.out.push_str(&ind.repeat(depth));
        }
    }

    fn close(&mut self, c: char, empty: bool, depth: usize) {
        if let (Some(ind), false) = (&self.indent, empty) {
            self.out.push('\n');
            self.out.push_str(&ind.repeat(depth));
        }
        self.out.push(c);
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        write!(self.out, "\\u{u:04x}").unwrap();
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents in [-4, 16),
/// else `d.ddde+XX`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}"); // shortest digits: "-1.5e-5", "1e16", "0e0"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = mant.strip_prefix('-').map_or(("", mant), |m| ("-", m));
    let digits = mant.replace('.', "");
    if (-4..16).contains(&exp) {
        if exp < 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else {
            let int_len = exp as usize + 1;
            let (int, frac) = if digits.len() > int_len {
                (digits[..int_len].to_string(), digits[int_len..].to_string())
            } else {
                (format!("{digits:0<int_len$}"), "0".to_string())
            };
            format!("{sign}{int}.{frac}")
        }
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{exp_sign}{:02}", exp.abs())
    }
}

/// C `strftime` over a UTC unix time, for `strftime_now`. Supports the common directives
/// (`%Y %y %m %d %e %H %I %M %S %p %B %b %h %A %a %j %F %T %Z %z %%` and glibc's `%-d`-style
/// no-padding flag); others are copied through, as glibc does.
fn strftime(format: &str, unix: i64) -> String {
    const MONTHS: &str = "January February March April May June July August September October \
                          November December";
    const DAYS: &str = "Sunday Monday Tuesday Wednesday Thursday Friday Saturday";
    const CUMULATIVE_DAYS: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let yday = CUMULATIVE_DAYS[m as usize - 1] + d + i64::from(leap && m > 2);
    let month = MONTHS.split(' ').nth(m as usize - 1).unwrap_or_default();
    let weekday = DAYS.split(' ').nth(weekday).unwrap_or_default();
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            let w = if no_pad { 0 } else { width };
            write!(out, "{v:0w$}").unwrap();
        };
        match spec {
            Some('Y') => num(&mut out, y, 0),
            Some('y') => num(&mut out, y.rem_euclid(100), 2),
            Some('m') => num(&mut out, m, 2),
            Some('d') => num(&mut out, d, 2),
            Some('e') if no_pad => num(&mut out, d, 0),
            Some('e') => write!(out, "{d:2}").unwrap(),
            Some('H') => num(&mut out, hh, 2),
            Some('I') => num(&mut out, h12, 2),
            Some('M') => num(&mut out, mm, 2),
            Some('S') => num(&mut out, ss, 2),
            Some('j') => num(&mut out, yday, 3),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('F') => write!(out, "{y:04}-{m:02}-{d:02}").unwrap(),
            Some('T') => write!(out, "{hh:02}:{mm:02}:{ss:02}").unwrap(),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, verbatim (research/model.md §2).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}";

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    /// The conversation the golden strings below were rendered with (Python jinja2 3.1.6 set up
    /// as transformers does: sandboxed, trim_blocks, lstrip_blocks, loopcontrols, HF tojson).
    fn conversation() -> Vec<ChatMessage> {
        msgs(&[
            ("system", "Be brief."),
            ("user", "  hi there \n"),
            ("assistant", "a reply"),
            ("user", "skip me"),
            ("user", "last one"),
            ("user", "beyond break"),
        ])
    }

    fn render(src: &str, m: &[ChatMessage]) -> Result<String, ModelError> {
        ChatTemplate::new(src, Some("<|begin_of_text|>"), Some("<|eot_id|>"))?.render(m, true)
    }

    #[test]
    fn smollm2_chatml_matches_the_reference() {
        let t = ChatTemplate::new(SMOLLM2, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        let got = t.render(&msgs(&[("user", "hi")]), true).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let got = t
            .render(&msgs(&[("system", "Be terse."), ("user", "hi")]), false)
            .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_style_bos_token_and_strip() {
        let src = "{{- bos_token }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'].strip() + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";
        let m = conversation();
        assert_eq!(
            render(src, &m[..2]).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // Without a bos_token it is undefined and prints nothing (as in HF), not "none".
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert!(t
            .render(&m[..1], false)
            .unwrap()
            .starts_with("<|start_header_id|>"));
    }

    #[test]
    fn trim_blocks_and_lstrip_blocks_like_jinja2() {
        let src = "{% for message in messages %}\n  {% if message.role == 'system' %}\nSystem: {{ message.content }}\n  {% else %}\n{{ message.role | upper }}: {{ message.content }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n    ASSISTANT:\n{% endif %}\n";
        assert_eq!(
            render(src, &conversation()).unwrap(),
            "System: Be brief.\nUSER:   hi there \n\nASSISTANT: a reply\nUSER: skip me\n\
             USER: last one\nUSER: beyond break\n    ASSISTANT:\n"
        );
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let src = "{% for m in messages %}{% if m.content.startswith('skip') %}{% continue %}{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}{{ m.content.split(' ')[0].upper() }}|{{ m.content.replace('a', 'A').title() }};{% endfor %}\n{% for k, v in {'x': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
        assert_eq!(
            render(src, &conversation()).unwrap(),
            "BE|Be Brief.;|  Hi There \n;A|A Reply;x=1"
        );
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let src = "{{ {'a': [1, 2.5, 1e16, 1.5e-5, none, true, 'é\"<>&'], 'b': {}} | tojson }}\n{{ {'k': [1, {'z': 0.0001}], 'l': []} | tojson(indent=2) }}\n{{ messages[0].content | tojson }}{{ messages[0].content | tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=[',', ':']) }}";
        let m = msgs(&[("user", "é\u{1}\u{7f}😀\n\"\\")]);
        assert_eq!(
            render(src, &m).unwrap(),
            "{\"a\": [1, 2.5, 1e+16, 1.5e-05, null, true, \"é\\\"<>&\"], \"b\": {}}\n{\n  \"k\": \
             [\n    1,\n    {\n      \"z\": 0.0001\n    }\n  ],\n  \"l\": []\n}\n\"é\\u0001\u{7f}😀\
             \\n\\\"\\\\\"\"\\u00e9\\u0001\\u007f\\ud83d\\ude00\\n\\\"\\\\\"|{\"a\":2,\"b\":1}"
        );
        for (f, s) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1e15, "1000000000000000.0"),
            (1e22, "1e+22"),
        ] {
            assert_eq!(py_float(f), s);
        }
        assert_eq!(py_float(123456789012345.6), "123456789012345.6");
        assert_eq!(py_float(5e-324), "5e-324");
    }

    #[test]
    fn raise_exception_carries_its_message() {
        let src = "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&msgs(&[("user", "a")]), true).unwrap(), "a");
        let e = t
            .render(&msgs(&[("user", "a"), ("user", "b")]), true)
            .unwrap_err();
        match e {
            ModelError::Template(msg) => assert_eq!(
                msg,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fuel_bounds_hostile_templates() {
        let t0 = std::time::Instant::now();
        // 10^7 iterations: a few seconds without fuel, an error after ~0.1 s with it.
        let nested =
            "{% for i in range(10000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}";
        let e = render(nested, &[]).unwrap_err().to_string();
        assert!(e.contains("out of fuel"), "{e}");
        // minijinja refuses huge ranges outright.
        assert!(render("{% for i in range(10**9) %}x{% endfor %}", &[]).is_err());
        // Output is capped separately from fuel.
        let t = ChatTemplate::new(
            "{% for i in range(100) %}{{ 'x' * 100 }}{% endfor %}",
            None,
            None,
        )
        .unwrap()
        .with_limits(None, 5000);
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("exceeds 5000 bytes"), "{e}");
        assert!(t0.elapsed().as_secs() < 20, "{:?}", t0.elapsed());
    }

    #[test]
    fn generation_tags_and_errors() {
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%} [{{ m.content }}] {%- endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}";
        let m = msgs(&[("user", "q"), ("assistant", "a")]);
        assert_eq!(render(src, &m).unwrap(), "q|[a]|");
        let e = ChatTemplate::new("{% for %}", None, None).unwrap_err();
        assert!(matches!(e, ModelError::Template(_)), "{e:?}");
        let e = render("{{ messages[0].nope.deeper }}", &m).unwrap_err();
        assert!(matches!(e, ModelError::Template(_)), "{e:?}");
    }

    #[test]
    fn strftime_formats_utc() {
        let t = 1_721_952_000 + 13 * 3600 + 5 * 60 + 9; // 2024-07-26 13:05:09 UTC, a Friday
        assert_eq!(
            strftime("%d %b %Y|%Y-%m-%d %H:%M:%S|%A %a %B %j %p %I %y|%-d %e|%%|%F %T", t),
            "26 Jul 2024|2024-07-26 13:05:09|Friday Fri July 208 PM 01 24|26 26|%|2024-07-26 13:05:09"
        );
        assert_eq!(strftime("%F %Q", 0), "1970-01-01 %Q");
        assert_eq!(strftime("%F", 951_782_400), "2000-02-29");
        let year = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        assert!(year.len() == 4 && year.starts_with('2'), "{year}");
    }
}
