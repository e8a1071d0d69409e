//! The end-to-end suites' registry and query rows, shared with the Python
//! package's tests (`python/tests/conftest.py` reads the same files):
//! `fixtures/registered.tsv` and `fixtures/queries.tsv`, tab-separated,
//! `#` lines are comments.

/// One query row and the answer it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// What the row shows (a note, not sent).
    pub what: &'static str,
    /// The name as an institution holds it.
    pub name: &'static str,
    /// The ID number as an institution holds it.
    pub id: &'static str,
    /// `match`, `no_match` or `invalid`.
    pub expected: &'static str,
}

/// Rows of a fixture file: the tab-separated fields of each line that is
/// neither empty nor a comment.
fn rows(text: &'static str) -> impl Iterator<Item = Vec<&'static str>> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split('\t').collect())
}

/// The registered (name, id) pairs.
#[must_use]
pub fn registered() -> Vec<(&'static str, &'static str)> {
    rows(include_str!("../fixtures/registered.tsv"))
        .map(|f| match f.as_slice() {
            [name, id] => (*name, *id),
            _ => panic!("registered.tsv: a row is not name<TAB>id: {f:?}"),
        })
        .collect()
}

/// The query rows, with their expected answers.
#[must_use]
pub fn queries() -> Vec<Query> {
    rows(include_str!("../fixtures/queries.tsv"))
        .map(|f| match f.as_slice() {
            [what, name, id, expected] => {
                assert!(
                    matches!(*expected, "match" | "no_match" | "invalid"),
                    "queries.tsv: {what}: unknown expected result {expected}"
                );
                Query {
                    what,
                    name,
                    id,
                    expected,
                }
            }
            _ => panic!("queries.tsv: a row is not what<TAB>name<TAB>id<TAB>expected: {f:?}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fixtures_parse_and_cover_every_answer() {
        let queries = super::queries();
        for want in ["match", "no_match", "invalid"] {
            assert!(queries.iter().any(|q| q.expected == want), "{want}");
        }
        assert!(queries.iter().any(|q| q.name.starts_with(' ')));
        assert!(queries.iter().any(|q| q.id.is_empty()));
        assert!(super::registered().len() >= 6);
    }
}
