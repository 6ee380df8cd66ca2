//! The SQL of one keyset page. Only names from the connector file (checked to be plain
//! identifiers, then quoted) and numbers we own are written into it; every value — window
//! bounds, keyset positions — is a bound parameter.

use std::fmt::Write;

use crate::config::sql::{Engine, From};

/// Whether the range's upper bound is in the range: a sync window is `[from, to]` (the
/// engine's contract), a trading day `[start, next start)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upper {
    Inclusive,
    Exclusive,
}

/// One page of rows whose `order[0]` lies in a range, after a keyset position, in
/// `order` order.
#[derive(Debug, Clone)]
pub struct PageQuery {
    pub sql: String,
    /// Parameter slots in placeholder order: `Lower`, `Upper`, then `After(i)` for the last
    /// row's value of `order[i]`.
    pub slots: Vec<Slot>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Lower,
    Upper,
    After(usize),
}

/// `SELECT columns FROM source WHERE order[0] in range [AND (order) > after] ORDER BY order
/// LIMIT limit`, the keyset comparison spelled out (`a > ? OR (a = ? AND b > ?)`) because
/// every engine plans that with an index on `order`, where row values are not everywhere.
pub fn page(
    engine: Engine,
    from: &From,
    columns: Option<&[String]>,
    order: &[String],
    upper: Upper,
    after: bool,
    limit: u32,
) -> PageQuery {
    let q = |name: &str| quote(engine, name);
    let mut slots = Vec::new();
    let mut sql = String::from("SELECT ");
    match columns {
        None => sql.push('*'),
        Some(columns) => {
            let list: Vec<String> = columns.iter().map(|c| q(c)).collect();
            sql.push_str(&list.join(", "));
        }
    }
    let _ = write!(sql, " FROM {} AS t360_src WHERE ", source(engine, from));
    let range = q(&order[0]);
    let placeholder = |slot: Slot, slots: &mut Vec<Slot>| {
        slots.push(slot);
        match engine {
            Engine::Postgres => format!("${}", slots.len()),
            Engine::MySql | Engine::Sqlite => "?".to_owned(),
        }
    };
    let lower = placeholder(Slot::Lower, &mut slots);
    let upper_op = match upper {
        Upper::Inclusive => "<=",
        Upper::Exclusive => "<",
    };
    let upper = placeholder(Slot::Upper, &mut slots);
    let _ = write!(sql, "{range} >= {lower} AND {range} {upper_op} {upper}");
    if after {
        // `c0 >= v0` first: implied by the comparison below, but an index range scan starts
        // there only when it is spelled as a bound of its own. Without it each page scans
        // from the window's start past every row read before: quadratic in the window.
        let start = placeholder(Slot::After(0), &mut slots);
        let _ = write!(sql, " AND {range} >= {start}");
        // (c0, c1, …) > (v0, v1, …), innermost last.
        let mut clause = String::new();
        for (i, column) in order.iter().enumerate() {
            let c = q(column);
            let gt = placeholder(Slot::After(i), &mut slots);
            if i + 1 == order.len() {
                let _ = write!(clause, "{c} > {gt}");
            } else {
                let eq = placeholder(Slot::After(i), &mut slots);
                let _ = write!(clause, "({c} > {gt} OR ({c} = {eq} AND ");
            }
        }
        clause.push_str(&")".repeat(2 * (order.len() - 1)));
        let _ = write!(sql, " AND {clause}");
    }
    let order_by: Vec<String> = order.iter().map(|c| q(c)).collect();
    let _ = write!(sql, " ORDER BY {} LIMIT {limit}", order_by.join(", "));
    PageQuery { sql, slots }
}

/// Every column of the source, no rows: prepared (never run) to learn the names and types.
pub fn shape(engine: Engine, from: &From) -> String {
    format!("SELECT * FROM {} AS t360_src", source(engine, from))
}

/// One non-null value of `column`: how a SQLite file writes its times.
pub fn sample(engine: Engine, from: &From, column: &str) -> String {
    let c = quote(engine, column);
    format!(
        "SELECT {c} FROM {} AS t360_src WHERE {c} IS NOT NULL LIMIT 1",
        source(engine, from)
    )
}

/// How many rows have no cursor value (and so never fall in a window).
pub fn null_count(engine: Engine, from: &From, column: &str) -> String {
    format!(
        "SELECT COUNT(*) FROM {} AS t360_src WHERE {} IS NULL",
        source(engine, from),
        quote(engine, column)
    )
}

/// How many rows of the window have a NULL key column: they cannot be keyset positions, and
/// where NULLs sort last they would never be read. Bounds in slots `Lower`, `Upper`.
pub fn null_keys(engine: Engine, from: &From, cursor: &str, keys: &[String]) -> PageQuery {
    let c = quote(engine, cursor);
    let nulls: Vec<String> = keys
        .iter()
        .map(|k| format!("{} IS NULL", quote(engine, k)))
        .collect();
    let (lower, upper) = match engine {
        Engine::Postgres => ("$1", "$2"),
        Engine::MySql | Engine::Sqlite => ("?", "?"),
    };
    PageQuery {
        sql: format!(
            "SELECT COUNT(*) FROM {} AS t360_src WHERE {c} >= {lower} AND {c} <= {upper} AND ({})",
            source(engine, from),
            nulls.join(" OR ")
        ),
        slots: vec![Slot::Lower, Slot::Upper],
    }
}

/// The per-day totals query of `SqlSource::day_totals`.
pub struct DayTotalsQuery {
    pub sql: String,
    /// Whether the naive zone's name is bound after the two bounds.
    pub zone: bool,
}

/// `SELECT day, [currency,] COUNT(*), SUM(s)… WHERE day_column >= lower AND < upper GROUP BY
/// day, currency`, the day being the column's UTC calendar day; `None` when this engine cannot
/// say that exactly for this kind of column.
#[allow(clippy::too_many_arguments)]
pub fn day_totals(
    engine: Engine,
    from: &From,
    column: &str,
    kind: super::value::TimeKind,
    zone_has_name: bool,
    naive_is_utc: bool,
    currency: Option<&str>,
    sums: &[String],
) -> Option<DayTotalsQuery> {
    use super::value::TimeKind;
    let c = quote(engine, column);
    let (day, zone) = match (engine, kind) {
        (_, TimeKind::Date) => (c.clone(), false),
        (Engine::Postgres, TimeKind::Instant) => {
            (format!("CAST({c} AT TIME ZONE 'UTC' AS date)"), false)
        }
        (Engine::Postgres, TimeKind::Civil) if zone_has_name => (
            format!("CAST(({c} AT TIME ZONE CAST($3 AS text)) AT TIME ZONE 'UTC' AS date)"),
            true,
        ),
        // The session is UTC: TIMESTAMP reads as UTC; DATETIME only when naive means UTC.
        (Engine::MySql, TimeKind::Instant) => (format!("DATE({c})"), false),
        (Engine::MySql, TimeKind::Civil) if naive_is_utc => (format!("DATE({c})"), false),
        _ => return None,
    };
    let (lower, upper) = match engine {
        Engine::Postgres => ("$1", "$2"),
        Engine::MySql | Engine::Sqlite => ("?", "?"),
    };
    let mut select = vec![format!("{day} AS t360_day")];
    let mut group = vec!["1".to_owned()];
    if let Some(currency) = currency {
        select.push(quote(engine, currency));
        group.push("2".into());
    }
    select.push("COUNT(*)".into());
    for s in sums {
        select.push(format!("SUM({})", quote(engine, s)));
    }
    Some(DayTotalsQuery {
        sql: format!(
            "SELECT {} FROM {} AS t360_src WHERE {c} >= {lower} AND {c} < {upper} GROUP BY {} ORDER BY {}",
            select.join(", "),
            source(engine, from),
            group.join(", "),
            group.join(", ")
        ),
        zone,
    })
}

fn source(engine: Engine, from: &From) -> String {
    match from {
        From::Table(table) => {
            let parts: Vec<String> = table.split('.').map(|p| quote(engine, p)).collect();
            parts.join(".")
        }
        From::Query(query) => format!("({query})"),
    }
}

/// An identifier, quoted for `engine`; `config::sql::is_identifier` has vouched for it.
fn quote(engine: Engine, name: &str) -> String {
    match engine {
        Engine::MySql => format!("`{name}`"),
        Engine::Postgres | Engine::Sqlite => format!("\"{name}\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn first_page_is_the_window_in_keyset_order() {
        let q = page(
            Engine::Postgres,
            &From::Table("crm.customers".into()),
            None,
            &names(&["updated_at", "id"]),
            Upper::Inclusive,
            false,
            500,
        );
        assert_eq!(
            q.sql,
            "SELECT * FROM \"crm\".\"customers\" AS t360_src WHERE \"updated_at\" >= $1 AND \
             \"updated_at\" <= $2 ORDER BY \"updated_at\", \"id\" LIMIT 500"
        );
        assert_eq!(q.slots, vec![Slot::Lower, Slot::Upper]);
    }

    #[test]
    fn later_pages_start_after_the_last_row_of_a_composite_key() {
        let q = page(
            Engine::MySql,
            &From::Query("SELECT a, b, c FROM t".into()),
            Some(&names(&["a", "b", "c"])),
            &names(&["a", "b", "c"]),
            Upper::Exclusive,
            true,
            10,
        );
        assert_eq!(
            q.sql,
            "SELECT `a`, `b`, `c` FROM (SELECT a, b, c FROM t) AS t360_src WHERE `a` >= ? AND \
             `a` < ? AND `a` >= ? AND (`a` > ? OR (`a` = ? AND (`b` > ? OR (`b` = ? AND `c` > ?)))) \
             ORDER BY `a`, `b`, `c` LIMIT 10"
        );
        let s = |i| Slot::After(i);
        assert_eq!(
            q.slots,
            vec![Slot::Lower, Slot::Upper, s(0), s(0), s(0), s(1), s(1), s(2)]
        );
    }
}
