//! Walking a MessagePack value's nodes in pre-order, for tests that edit
//! one node of a message (the codec's property tests and the daemon fuzz
//! run, which includes this file).

use rmpv::Value;

/// Nodes in `v`, itself included.
pub fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| count_nodes(k) + count_nodes(v))
            .sum(),
        _ => 0,
    }
}

/// The node at pre-order index `at` (which must be below the node count).
pub fn node_mut(v: &mut Value, at: usize) -> &mut Value {
    if at == 0 {
        return v;
    }
    let mut at = at - 1;
    let children: Vec<&mut Value> = match v {
        Value::Array(items) => items.iter_mut().collect(),
        Value::Map(entries) => entries.iter_mut().flat_map(|(k, v)| [k, v]).collect(),
        _ => unreachable!("index below the node count"),
    };
    for child in children {
        let n = count_nodes(child);
        if at < n {
            return node_mut(child, at);
        }
        at -= n;
    }
    unreachable!("index below the node count")
}
