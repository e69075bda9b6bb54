// Command etcd is the etcd server, built from the go.etcd.io/etcd/server/v3
// module for the local test cluster (hack/cluster.sh). It is the same entry
// point as etcd's own server/main.go.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
