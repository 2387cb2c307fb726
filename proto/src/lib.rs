//! moeshard proto
