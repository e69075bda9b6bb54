// Command nodetest is the test image of the local cluster's real node
// (tests/e2e/node): one static binary, FROM scratch, with a subcommand per
// thing a test needs a container to do.
//
//	nodetest echo <words>...         print the words, exit 0
//	nodetest sleep                   sleep until SIGTERM/SIGINT, then exit 0
//	nodetest serve <port>            HTTP on :<port>, answers "hello from <hostname>"
//	nodetest get <url>...            GET each until 200 (60 s each), print the bodies
//	nodetest resolve <name>          print the addresses of <name>
//	nodetest write <file> <text>     write text to file (creating it)
//	nodetest cat <file>              print a file
//	nodetest probe <ms> <host:port>... forever, about once a second: a TCP connect to each
//	                                 (at once, <ms> timeout), one line per round:
//	                                 "probe <unix ms> <host:port>=open|refused|timeout|error ..."
package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: nodetest echo|sleep|serve|get|resolve|write|cat|probe ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "echo":
		fmt.Println(strings.Join(args, " "))
	case "sleep":
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
	case "serve":
		need(args, 1)
		serve(args[0])
	case "get":
		need(args, 1)
		for _, url := range args {
			get(url, 60*time.Second)
		}
	case "resolve":
		need(args, 1)
		addrs, err := net.LookupHost(args[0])
		check(err)
		fmt.Println(strings.Join(addrs, " "))
	case "write":
		need(args, 2)
		check(os.WriteFile(args[0], []byte(args[1]), 0o644))
	case "probe":
		need(args, 2)
		ms, err := strconv.Atoi(args[0])
		check(err)
		probe(time.Duration(ms)*time.Millisecond, args[1:])
	case "cat":
		need(args, 1)
		data, err := os.ReadFile(args[0])
		check(err)
		os.Stdout.Write(data)
	default:
		fail("unknown subcommand " + os.Args[1])
	}
}

func serve(port string) {
	host, _ := os.Hostname()
	http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "hello from %s\n", host)
	})
	fmt.Println("serving on :" + port)
	check(http.ListenAndServe(":"+port, nil))
}

// get retries until the URL answers 200 (DNS and Services may take a moment).
func get(url string, timeout time.Duration) {
	client := http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(timeout)
	for {
		resp, err := client.Get(url)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				os.Stdout.Write(body)
				return
			}
			err = fmt.Errorf("status %d, read error %v", resp.StatusCode, rerr)
		}
		if time.Now().After(deadline) {
			fail(fmt.Sprintf("GET %s: %v", url, err))
		}
		fmt.Fprintf(os.Stderr, "GET %s: %v (retrying)\n", url, err)
		time.Sleep(time.Second)
	}
}

// probe tells a dropped connection attempt (timeout: a NetworkPolicy at work)
// from one the peer's kernel answered (open, or refused when nothing listens).
func probe(timeout time.Duration, addrs []string) {
	for {
		states := make([]string, len(addrs))
		start := time.Now()
		var wg sync.WaitGroup
		for i, addr := range addrs {
			wg.Add(1)
			go func(i int, addr string) {
				defer wg.Done()
				states[i] = addr + "=" + dialState(addr, timeout)
			}(i, addr)
		}
		wg.Wait()
		fmt.Printf("probe %d %s\n", start.UnixMilli(), strings.Join(states, " "))
		time.Sleep(time.Second)
	}
}

func dialState(addr string, timeout time.Duration) string {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	var netErr net.Error
	switch {
	case err == nil:
		conn.Close()
		return "open"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.As(err, &netErr) && netErr.Timeout():
		return "timeout"
	default:
		return "error:" + strings.ReplaceAll(err.Error(), " ", "_")
	}
}

func need(args []string, n int) {
	if len(args) < n {
		fail(fmt.Sprintf("%s needs %d argument(s), got %d", os.Args[1], n, len(args)))
	}
}

func check(err error) {
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "nodetest:", msg)
	os.Exit(1)
}
