//! The API's query-string parsers: collection filters and paging, and process filters.

use drover_server::api::schema::RESOURCE_TYPES;
use drover_server::fuzzing;
use drover_store::{FilterOp, FilterValue};

/// The project the filters are parsed for.
const PROJECT: i64 = 5;

/// Parses `data` as the query string of every collection and of the process list. Returns
/// whether some parser accepted it.
pub fn query(data: &[u8]) -> bool {
    let raw = String::from_utf8_lossy(data);
    let mut accepted = false;
    for schema in RESOURCE_TYPES {
        accepted |= collection(schema, &raw);
    }
    processes(&raw) || accepted
}

fn collection(schema: &drover_server::api::schema::TypeSchema, raw: &str) -> bool {
    let query = match fuzzing::list_query(schema, PROJECT, Some(raw)) {
        Ok(query) => query,
        Err(error) => {
            assert!(
                error.status().is_client_error(),
                "{raw:?} on {}: {error:?}",
                schema.plural
            );
            return false;
        }
    };
    assert_eq!(query.account_id, Some(PROJECT));
    assert!((1..=1000).contains(&query.limit));
    let columns: Vec<&str> = drover_server::api::schema::fields_of(schema)
        .filter_map(|field| field.column)
        .collect();
    for filter in &query.filters {
        assert!(
            columns.contains(&filter.column),
            "{raw:?} filters {} on {}",
            filter.column,
            schema.plural
        );
        if let FilterValue::Int(id) = filter.value {
            assert!(id > 0, "{raw:?} gives the id {id}");
        }
        if matches!(filter.op, FilterOp::Like) {
            assert!(matches!(
                filter.value,
                FilterValue::Text(_) | FilterValue::Int(_)
            ));
        }
    }
    // The `next` link repeats the query: the same filters and limit, and the new marker.
    let pagination = fuzzing::pagination("http://h/v1/x", Some(raw), query.limit, Some(77));
    let next = pagination["next"].as_str().expect("a next link");
    let next_raw = next.split_once('?').map(|(_, q)| q).unwrap_or("");
    let again = fuzzing::list_query(schema, PROJECT, Some(next_raw))
        .unwrap_or_else(|error| panic!("{raw:?}: the next link {next:?} is refused: {error:?}"));
    assert_eq!(again.filters, query.filters, "{raw:?} -> {next:?}");
    assert_eq!(again.limit, query.limit);
    assert_eq!(again.marker, Some(77));
    true
}

fn processes(raw: &str) -> bool {
    let filter = match fuzzing::process_filter(Some(raw)) {
        Ok(filter) => filter,
        Err(error) => {
            assert!(error.status().is_client_error(), "{raw:?}: {error:?}");
            return false;
        }
    };
    assert!((1..=1000).contains(&filter.limit));
    if let Some(status) = &filter.status {
        assert!(["running", "delayed", "ready", "pending", "done"].contains(&status.as_str()));
    }
    if let Some(id) = filter.resource_id {
        assert!(id > 0);
        // Ids are numbered per type: an id filter without its type would match every type.
        assert!(
            filter.kind.is_some(),
            "{raw:?}: resourceId without its type"
        );
    }
    if let Some(result) = &filter.result {
        assert_eq!(*result, result.to_uppercase());
    }
    let pagination = fuzzing::pagination("http://h/v1/x", Some(raw), filter.limit, Some(77));
    let next = pagination["next"].as_str().expect("a next link");
    let next_raw = next.split_once('?').map(|(_, q)| q).unwrap_or("");
    let again = fuzzing::process_filter(Some(next_raw))
        .unwrap_or_else(|error| panic!("{raw:?}: the next link {next:?} is refused: {error:?}"));
    assert_eq!(
        (
            &again.name,
            again.kind,
            again.resource_id,
            &again.status,
            &again.result,
            again.limit
        ),
        (
            &filter.name,
            filter.kind,
            filter.resource_id,
            &filter.status,
            &filter.result,
            filter.limit
        ),
        "{raw:?} -> {next:?}"
    );
    assert_eq!(again.marker, Some(77));
    true
}
