//! The hub DDL shipped in `packaging/clickhouse/` is exactly what
//! `scripts/hub ddl` prints from the columns the test hub is built with,
//! so the two cannot drift apart; and its `logs` table has every column
//! `codi2 logs --hub` reads. (`scripts/hub-selftest` also applies
//! `single-node.sql` to the test hub.)

use std::path::Path;
use std::process::Command;

fn hub_script(args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/hub"))
        .args(args)
        .output()
        .expect("run scripts/hub");
    assert!(
        out.status.success(),
        "scripts/hub {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The column lines of `CREATE TABLE ... <table> (` in `sql`.
fn columns<'a>(sql: &'a str, table: &str) -> Vec<&'a str> {
    let start = sql
        .find(&format!("{table} ("))
        .or_else(|| sql.find(&format!("{table} ON CLUSTER codi (")))
        .unwrap_or_else(|| panic!("no table {table} in:\n{sql}"));
    sql[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with(')'))
        .map(|l| l.trim().trim_end_matches(','))
        .collect()
}

#[test]
fn packaging_clickhouse_is_what_scripts_hub_generates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let test_hub = hub_script(&["sql"]);
    for kind in ["single-node", "cluster"] {
        let file = root.join(format!("packaging/clickhouse/{kind}.sql"));
        let shipped = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            shipped,
            hub_script(&["ddl", kind]),
            "{} is stale: run `scripts/hub ddl {kind} > {}`",
            file.display(),
            file.display()
        );
        for table in ["logs", "sessions", "export_archive"] {
            let name = if kind == "cluster" {
                format!("codi.{table}_local")
            } else {
                format!("codi.{table}")
            };
            assert_eq!(
                columns(&shipped, &name),
                columns(&test_hub, &format!("codi_s1r1.{table}")),
                "{kind}: {table}"
            );
        }
    }
    let logs = columns(&test_hub, "codi.logs");
    let names: Vec<&str> = logs.iter().map(|c| c.split(' ').next().unwrap()).collect();
    assert_eq!(
        names,
        [
            "host_id",
            "id",
            "uuid",
            "timestamp",
            "level",
            "component",
            "session_id",
            "message",
            "metadata",
            "created_at",
            "uid"
        ],
        "the columns codi2 logs --hub reads (src/client/hub_query.rs)"
    );
}
