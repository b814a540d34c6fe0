//! The README's flag table is the command line's: every flag of `ldt up` is documented with
//! its variable, and every documented flag exists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use clap::Args;

#[test]
fn the_readme_documents_every_flag_of_ldt_up_with_its_variable() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md at the repository root");
    // Rows of the form "| `--flag` | `LDT_VAR` | default | what |".
    let documented: BTreeMap<String, String> = readme
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let flag = cells.next()?.strip_prefix("`--")?.strip_suffix('`')?;
            let env = cells.next()?.trim_matches('`');
            Some((flag.to_owned(), env.to_owned()))
        })
        .collect();
    let command = ldt_runtime::configuration::Settings::augment_args(clap::Command::new("up"));
    let actual: BTreeMap<String, String> = command
        .get_arguments()
        // Hidden flags (test hooks) are left out of `--help`, and of the README.
        .filter(|arg| !arg.is_hide_set())
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let env = arg.get_env()?.to_string_lossy().into_owned();
            Some((long.to_owned(), env))
        })
        .collect();
    assert!(actual.len() > 20, "{actual:?}");
    assert_eq!(
        documented, actual,
        "README's flag table (left) and `ldt up --help` (right) differ"
    );
}
