//! Reading the flat XML documents of AWS's query protocol (STS, SNS): the text of a named
//! element and the bodies of repeated ones. Enough for their answers, which carry no
//! attributes the sinks need, no CDATA and no nesting of the same name.

/// The bodies of every `<tag>…</tag>` in `doc`, in order (raw, not unescaped).
pub fn elements<'a>(doc: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        out.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    out
}

/// The unescaped text of the first `<tag>…</tag>` in `doc`.
pub fn text(doc: &str, tag: &str) -> Option<String> {
    elements(doc, tag).first().map(|t| unescape(t))
}

/// XML's five entities and numeric character references.
pub fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(end) = tail.find(';') else {
            out.push_str(tail);
            return out;
        };
        let entity = &tail[1..end];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match ch {
            Some(c) => out.push(c),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_and_entities() {
        let doc =
            "<R><Failed><member><Id>1</Id><Message>a &lt;b&gt; &amp; &#233;</Message></member>\
                   <member><Id>2</Id></member></Failed></R>";
        let members = elements(doc, "member");
        assert_eq!(members.len(), 2);
        assert_eq!(text(members[0], "Message").as_deref(), Some("a <b> & é"));
        assert_eq!(text(members[1], "Id").as_deref(), Some("2"));
        assert_eq!(text(doc, "Nope"), None);
    }
}
