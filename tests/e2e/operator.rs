//! Operator experience end to end (being written).
