//go:build tools

// Package tools records the command hack/cluster.sh builds from this module
// (sigs.k8s.io/kube-network-policies/cmd), so that `go mod tidy` keeps its
// requirements.
package tools

import _ "sigs.k8s.io/kube-network-policies/cmd"
