// fluxcel evaluates Flux healthCheckExprs (Kustomization.spec.healthCheckExprs, Flux RFC-0009) against objects,
// in the CEL environment Flux's kustomize-controller uses, so tests can check the expressions in
// docs/gitops/ against real FineTuneJobs without a Flux installation.
//
// stdin: {"current": "...", "failed": "...", "inProgress": "...", "objects": [{...}, ...]}
// stdout: one status per object, one per line: Current, Failed or InProgress.
//
// With no expressions at all it computes kstatus instead (sigs.k8s.io/cli-utils status.Compute), which is what
// Flux uses for custom resources by default.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/ext"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type input struct {
	Current    string           `json:"current"`
	Failed     string           `json:"failed"`
	InProgress string           `json:"inProgress"`
	Objects    []map[string]any `json:"objects"`
}

// program parses (without type-checking, as Flux does: CRDs need not have the usual top-level fields) and plans
// an expression with Flux's environment options.
func program(expr string) (cel.Program, error) {
	env, err := cel.NewEnv(
		cel.HomogeneousAggregateLiterals(),
		cel.EagerlyValidateDeclarations(true),
		cel.DefaultUTCTimeZone(true),
		cel.CrossTypeNumericComparisons(true),
		cel.OptionalTypes(),
		ext.Strings(),
		ext.Sets(),
		ext.Encoders(),
	)
	if err != nil {
		return nil, err
	}
	ast, issues := env.Parse(expr)
	if issues != nil && issues.Err() != nil {
		return nil, fmt.Errorf("parsing %q: %w", expr, issues.Err())
	}
	return env.Program(ast, cel.EvalOptions(cel.OptOptimize), cel.InterruptCheckFrequency(100))
}

func isTrue(p cel.Program, obj map[string]any) (bool, error) {
	val, _, err := p.Eval(obj)
	if err != nil {
		return false, err
	}
	b, ok := val.(types.Bool)
	if !ok {
		return false, fmt.Errorf("not a boolean: %v", val)
	}
	return bool(b), nil
}

// generations returns (status.observedGeneration, metadata.generation) when both are present.
func generations(obj map[string]any) (int64, int64, bool) {
	status, _ := obj["status"].(map[string]any)
	metadata, _ := obj["metadata"].(map[string]any)
	observed, ok1 := status["observedGeneration"].(int64)
	generation, ok2 := metadata["generation"].(int64)
	return observed, generation, ok1 && ok2
}

// kubernetesNumbers turns JSON numbers into int64 where they are whole and float64 otherwise, as the API
// machinery's unstructured objects hold them.
func kubernetesNumbers(v any) any {
	switch t := v.(type) {
	case map[string]any:
		for k, e := range t {
			t[k] = kubernetesNumbers(e)
		}
	case []any:
		for i, e := range t {
			t[i] = kubernetesNumbers(e)
		}
	case json.Number:
		if i, err := t.Int64(); err == nil {
			return i
		}
		f, _ := t.Float64()
		return f
	}
	return v
}

func run() error {
	var in input
	decoder := json.NewDecoder(os.Stdin)
	decoder.UseNumber()
	if err := decoder.Decode(&in); err != nil {
		return err
	}
	for i, obj := range in.Objects {
		in.Objects[i] = kubernetesNumbers(obj).(map[string]any)
	}
	// RFC-0009's order: inProgress, failed, current; the first that is true wins; none: InProgress.
	type check struct {
		expr, status string
	}
	var programs []cel.Program
	var statuses []string
	for _, c := range []check{{in.InProgress, "InProgress"}, {in.Failed, "Failed"}, {in.Current, "Current"}} {
		if c.expr == "" {
			continue
		}
		p, err := program(c.expr)
		if err != nil {
			return err
		}
		programs = append(programs, p)
		statuses = append(statuses, c.status)
	}
	if len(programs) == 0 {
		for _, obj := range in.Objects {
			result, err := status.Compute(&unstructured.Unstructured{Object: obj})
			if err != nil {
				return err
			}
			fmt.Println(result.Status)
		}
		return nil
	}
	for _, obj := range in.Objects {
		result := "InProgress"
		if observed, generation, ok := generations(obj); !ok || observed == generation {
			for i, p := range programs {
				t, err := isTrue(p, obj)
				if err != nil {
					return err
				}
				if t {
					result = statuses[i]
					break
				}
			}
		}
		fmt.Println(result)
	}
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
