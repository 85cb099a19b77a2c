//! `model` from a `multipart/form-data` body (`audio/transcriptions`,
//! `audio/translations`, `images/edits`): the value of the part named
//! `model`. The body goes upstream unchanged; only that small part is read.

use memchr::memmem;

/// The boundary of a `multipart/form-data` content type, if it is one.
pub fn boundary(content_type: &[u8]) -> Option<&[u8]> {
    // Asked of every request with a body, nearly all JSON: their media
    // type is told apart before anything is split.
    const FORM: &[u8] = b"multipart/form-data";
    let media = content_type.trim_ascii_start().get(..FORM.len())?;
    if !media.eq_ignore_ascii_case(FORM) {
        return None;
    }
    let text = std::str::from_utf8(content_type).ok()?;
    let mut params = text.split(';');
    let media = params.next()?.trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').as_bytes())
            .filter(|b| !b.is_empty() && b.len() <= 200)
    })
}

/// The value of the part named `model`, trimmed; `None` when there is none
/// (or it is not UTF-8).
pub fn model<'a>(body: &'a [u8], boundary: &[u8]) -> Option<&'a str> {
    let mut delimiter = Vec::with_capacity(boundary.len() + 4);
    delimiter.extend_from_slice(b"--");
    delimiter.extend_from_slice(boundary);
    let finder = memmem::Finder::new(&delimiter);
    let mut at = finder.find(body)? + delimiter.len();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return None;
        }
        // A part: its headers up to a blank line, then its content up to
        // the next delimiter (the CRLF before it belongs to the delimiter).
        let head_end = memmem::find(rest, b"\r\n\r\n")?;
        let head = &rest[..head_end];
        let content_from = head_end + 4;
        let next = finder.find(&rest[content_from..])? + content_from;
        if names_model(head) {
            let content = &rest[content_from..next];
            let content = content.strip_suffix(b"\r\n").unwrap_or(content);
            return std::str::from_utf8(content).ok().map(str::trim);
        }
        at += next + delimiter.len();
    }
}

/// Whether a part's headers say `Content-Disposition: form-data; name="model"`.
fn names_model(head: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(head) else {
        return false;
    };
    text.split("\r\n").any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        name.trim().eq_ignore_ascii_case("content-disposition")
            && value.split(';').any(|p| {
                p.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("name") && v.trim().trim_matches('"') == "model"
                })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(boundary: &str, parts: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in parts {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    #[test]
    fn reads_the_model_part_wherever_it_is() {
        let b = "----WebKitFormBoundaryx1";
        let body = form(
            b,
            &[
                ("file", "RIFF....binary--data"),
                ("model", "whisper-1"),
                ("language", "en"),
            ],
        );
        assert_eq!(model(&body, b.as_bytes()), Some("whisper-1"));
        let first = form(b, &[("model", " whisper-1 "), ("file", "x")]);
        assert_eq!(model(&first, b.as_bytes()), Some("whisper-1"));
        let none = form(b, &[("file", "x")]);
        assert_eq!(model(&none, b.as_bytes()), None);
        assert_eq!(model(b"not multipart", b.as_bytes()), None);
        assert_eq!(model(b"--x\r\nbroken", b"x"), None);
    }

    #[test]
    fn the_boundary_comes_from_the_content_type() {
        assert_eq!(
            boundary(b"multipart/form-data; boundary=abc"),
            Some(&b"abc"[..])
        );
        assert_eq!(
            boundary(b"Multipart/Form-Data; charset=x; Boundary=\"a b\""),
            Some(&b"a b"[..])
        );
        assert_eq!(boundary(b"application/json"), None);
        assert_eq!(boundary(b"multipart/form-data"), None);
    }
}
