//! Values from rows, rendered inert. The template engine escapes `<`, `>`, `&` and `"` in every
//! value; on top of that control characters (which can hide text, fake line breaks in a log-like
//! view, or be a NUL) are shown as visible escapes, and payloads that are not UTF-8 text are shown
//! as a hex dump, never decoded as markup.

use chrono::{DateTime, Utc};
use maud::{html, Markup};

/// `s` as text, each control character as a visible `\u{..}` escape (newlines and tabs in
/// multi-line text are kept when `multiline`).
pub fn text_with(s: &str, multiline: bool) -> Markup {
    let mut parts: Vec<(bool, String)> = Vec::new();
    for c in s.chars() {
        let keep = multiline && (c == '\n' || c == '\t');
        let ctl = (c.is_control() && !keep)
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        let piece = if ctl {
            format!("\\u{{{:x}}}", c as u32)
        } else {
            c.to_string()
        };
        match parts.last_mut() {
            Some((was_ctl, buf)) if *was_ctl == ctl => buf.push_str(&piece),
            _ => parts.push((ctl, piece)),
        }
    }
    html! {
        @for (ctl, p) in &parts {
            @if *ctl { span.ctl title="control character" { (p) } } @else { (p) }
        }
    }
}

/// One-line text (control characters, newlines included, escaped).
pub fn text(s: &str) -> Markup {
    text_with(s, false)
}

/// An optional value, `-` when absent.
pub fn opt(s: Option<&str>) -> Markup {
    match s {
        Some(s) => text(s),
        None => html! { span.muted { "-" } },
    }
}

/// A payload: UTF-8 text as text (pretty-printed when it is JSON), anything else as a hex dump.
pub fn payload(bytes: &[u8]) -> Markup {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let pretty = serde_json::from_str::<serde_json::Value>(s)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok());
            html! { pre.payload { (text_with(pretty.as_deref().unwrap_or(s), true)) } }
        }
        Err(_) => html! {
            p.muted { "Not UTF-8 text: shown as hex." }
            pre.payload.hex { (hex_dump(bytes)) }
        },
    }
}

/// `offset  hex bytes  ascii` lines, 16 bytes a line; non-printable bytes as `.`.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "{:08x}  {:<47}  {}\n",
            i * 16,
            hex.join(" "),
            ascii
        ));
    }
    out
}

/// A time as RFC 3339 with the age next to it.
pub fn time(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        None => html! { span.muted { "-" } },
        Some(t) => html! {
            time datetime=(t.to_rfc3339()) title=(t.to_rfc3339()) {
                (t.format("%Y-%m-%d %H:%M:%S")) " UTC"
            }
            " " span.muted { "(" (ago(t)) ")" }
        },
    }
}

/// `12 s ago`, `3 min ago`, `2 h ago`, `4 d ago` (or `in ...` for the future).
pub fn ago(t: DateTime<Utc>) -> String {
    let secs = (Utc::now() - t).num_seconds();
    let (a, fut) = (secs.unsigned_abs(), secs < 0);
    let s = seconds(a as f64);
    if fut {
        format!("in {s}")
    } else {
        format!("{s} ago")
    }
}

/// A duration in the largest fitting unit.
pub fn seconds(s: f64) -> String {
    let a = s.abs();
    if a < 120.0 {
        format!("{a:.0} s")
    } else if a < 7200.0 {
        format!("{:.0} min", a / 60.0)
    } else if a < 172_800.0 {
        format!("{:.1} h", a / 3600.0)
    } else {
        format!("{:.1} d", a / 86400.0)
    }
}

/// A count with thousands separators.
pub fn num(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Percent-encodes `s` for a URL query value or path segment.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_inert() {
        let m = text("<script>alert(\"x\")</script>\u{0}\r\n\u{202e}").into_string();
        assert!(!m.contains("<script"), "{m}");
        assert!(m.contains("&lt;script&gt;"), "{m}");
        assert!(m.contains("&quot;"), "{m}");
        assert!(
            m.contains("\\u{0}") && m.contains("\\u{d}") && m.contains("\\u{a}"),
            "{m}"
        );
        assert!(m.contains("\\u{202e}"), "{m}");
        assert!(!m.contains('\u{0}') && !m.contains('\r'));
        let p = payload(&[0xff, 0x00, b'<', b's']).into_string();
        assert!(p.contains("ff 00 3c 73") && p.contains("..&lt;s"), "{p}");
        assert_eq!(enc("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(num(1234567), "1,234,567");
    }
}
