// Command coredns is CoreDNS with only the plugins the local cluster's real
// node needs (hack/cluster.sh): cluster DNS from the API server (kubernetes),
// NXDOMAIN for every other name (template: nothing leaves the machine),
// caching, health/readiness and the listen address (bind). Building all of
// CoreDNS's plugins would take several times longer.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

// directives: the plugins above, in the order of CoreDNS's plugin.cfg (the
// order in which a query passes through them).
var directives = []string{"bind", "ready", "health", "errors", "log", "cache", "template", "kubernetes"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
