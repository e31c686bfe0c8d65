//! A value that must never reach a log or an error message: the stats password, a bearer
//! token. `Debug` prints `<redacted>`; the text is reached only through [`Secret::expose`],
//! so every use of it can be found.

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_text() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            user: String,
            password: Secret,
        }
        let h = Holder { user: "scraper".into(), password: Secret::new("s3cret-pass") };
        let text = format!("{h:?} {h:#?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("<redacted>") && text.contains("scraper"), "{text}");
        assert_eq!(h.password.expose(), "s3cret-pass");
    }
}
