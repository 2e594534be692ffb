//! Tests of the routing stage.
