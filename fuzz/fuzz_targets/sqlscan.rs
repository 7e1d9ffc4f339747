//! Feeds arbitrary text to the SQL scanner the config loader checks primers' and updaters' SQL with. It
//! must never panic, and every offset it reports must be a position in the text. The same text goes to
//! the readers of plan expressions (`kck::plan::expr`), which must never panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    for many in [false, true] {
        match kck::sqlscan::scan_statements(sql, many) {
            Ok(statements) => {
                for s in statements {
                    assert!(s.start() <= s.end() && s.end() <= sql.len());
                    assert!(sql.get(s.start()..s.end()).is_some());
                }
            }
            Err((offset, _)) => assert!(offset <= sql.len()),
        }
    }
    let _ = kck::sqlscan::scan_sql(sql);
    let _ = kck::plan::expr::equalities(sql, "t");
    let _ = kck::plan::expr::column_equalities(sql);
    let _ = kck::plan::expr::functions(sql);
    kck::plan::expr::refs(sql, &mut kck::plan::expr::Refs::default());
});
