//! The lexer: an expression string to tokens (parentheses, `not`/`!`, `and`/`&&`,
//! `or`/`||`, and words). Words end only at ASCII whitespace, parentheses, `&&` and `||`.
//!
//! It works on bytes and compares only ASCII ones, so a word always starts and ends on a
//! character boundary of the text, whatever the text holds.

use super::error::FilterError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokKind {
    LParen,
    RParen,
    Not,
    And,
    Or,
    Word,
}

#[derive(Debug, Clone)]
pub(super) struct Token {
    pub(super) kind: TokKind,
    pub(super) text: String,
}

pub(super) fn tokenize(s: &str) -> Result<Vec<Token>, FilterError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let push = |out: &mut Vec<Token>, kind, text: &str| {
        out.push(Token {
            kind,
            text: text.to_string(),
        })
    };
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'(' {
            push(&mut out, TokKind::LParen, "(");
            i += 1;
        } else if c == b')' {
            push(&mut out, TokKind::RParen, ")");
            i += 1;
        } else if c == b'!' && b.get(i + 1) != Some(&b'=') {
            push(&mut out, TokKind::Not, "!");
            i += 1;
        } else if b[i..].starts_with(b"&&") {
            push(&mut out, TokKind::And, "&&");
            i += 2;
        } else if b[i..].starts_with(b"||") {
            push(&mut out, TokKind::Or, "||");
            i += 2;
        } else {
            let start = i;
            while i < b.len() {
                let c = b[i];
                if c.is_ascii_whitespace()
                    || c == b'('
                    || c == b')'
                    || b[i..].starts_with(b"&&")
                    || b[i..].starts_with(b"||")
                {
                    break;
                }
                i += 1;
            }
            // A word ends at an ASCII byte or at the end of the text, and a byte below 0x80
            // is never inside a multi-byte character: `start..i` is on char boundaries.
            let word = &s[start..i];
            let kind = match word.to_ascii_lowercase().as_str() {
                "and" => TokKind::And,
                "or" => TokKind::Or,
                "not" => TokKind::Not,
                _ => TokKind::Word,
            };
            if kind == TokKind::Word {
                check_word_chars(word)?;
            }
            push(&mut out, kind, word);
        }
    }
    Ok(out)
}

/// Reject characters that are not part of the language early, with a message about what
/// they are (a pasted typographic quote) or what they are for in tcpdump.
fn check_word_chars(word: &str) -> Result<(), FilterError> {
    if let Some(c) = word.chars().find(|c| !c.is_ascii()) {
        return Err(FilterError::invalid(
            word,
            format!(
                "the character U+{:04X} ({}) is not part of the filter language \
                 (a typographic quote, dash or space pasted from a document?)",
                u32::from(c),
                c.escape_debug()
            ),
        ));
    }
    if word.contains(['[', ']']) {
        return Err(FilterError::unsupported(
            word,
            "byte-offset expressions like tcp[13] are not supported",
        ));
    }
    if word.contains(['=', '<', '>', '+', '*', '&', '|', '^', '%']) {
        return Err(FilterError::unsupported(
            word,
            "arithmetic and comparison expressions are not supported",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<(TokKind, String)> {
        tokenize(s)
            .unwrap()
            .into_iter()
            .map(|t| (t.kind, t.text))
            .collect()
    }

    #[test]
    fn operators_split_words() {
        use TokKind::*;
        assert_eq!(
            kinds("(tcp&&!udp)||not(x)"),
            [
                (LParen, "("),
                (Word, "tcp"),
                (And, "&&"),
                (Not, "!"),
                (Word, "udp"),
                (RParen, ")"),
                (Or, "||"),
                (Not, "not"),
                (LParen, "("),
                (Word, "x"),
                (RParen, ")"),
            ]
            .map(|(k, t)| (k, t.to_string()))
        );
    }

    /// Every cut of a text with multi-byte characters tokenizes or fails cleanly (the lexer
    /// once sliced the text inside a character: a panic for about one random expression in
    /// four).
    #[test]
    fn multibyte_characters_never_split() {
        let text = "host ’10.0.0.1’ && é||ü(ß) ！tcp \u{a0}port\u{2003}80 日本&&語||";
        let mut cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        cuts.push(text.len());
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let _ = tokenize(&text[a..b]);
            }
        }
        let e = tokenize("host 10.0.0.1 and ’tcp’").unwrap_err();
        assert_eq!(e.near(), "’tcp’");
        assert!(e.to_string().contains("U+2019"), "{e}");
    }
}
